"""The function rq jobs of this project name (`broker.jobs.JOB_FUNC`).

`worker run` never calls it: the batching worker completes these jobs itself, many images per
engine call. A plain `rq worker` that picks such a job up fails it with this explanation instead of
doing something slow or wrong.
"""

from __future__ import annotations


def segment_images(image_ids: list[str]) -> None:
    """Placeholder target of segmentation jobs; always raises (run `worker run --engine FILE`)."""
    raise RuntimeError(
        f"segmentation jobs ({len(image_ids)} images) must be run by `worker run --engine FILE`, not by `rq worker`"
    )
