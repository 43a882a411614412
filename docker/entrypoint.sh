#!/bin/sh
# Entrypoint of the segqueue images. If REDIS_PASSWORD_FILE names a file (a Docker/Compose secret such
# as /run/secrets/redis_password), its first line becomes the password in REDIS_URL (URL-encoded), so the
# password is in neither the image, the command line nor the compose file. Then runs the command.
set -eu
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    if [ ! -r "$REDIS_PASSWORD_FILE" ]; then
        echo "error: REDIS_PASSWORD_FILE=$REDIS_PASSWORD_FILE is not readable" >&2
        exit 2
    fi
    REDIS_URL="$(python3 - <<'PY'
import os
from urllib.parse import quote, urlsplit, urlunsplit

url = urlsplit(os.environ.get("REDIS_URL") or "redis://redis:6379/0")
with open(os.environ["REDIS_PASSWORD_FILE"], encoding="utf-8") as f:
    password = f.readline().rstrip("\r\n")
host = url.netloc.rpartition("@")[2]
user = url.username or ""
print(urlunsplit(url._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}")))
PY
)"
    export REDIS_URL
fi
exec "$@"
