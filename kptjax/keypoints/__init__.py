"""What a keypoint is: KeypointSpec and the named body models (spec files in data/)."""

from kptjax.keypoints.registry import (
    get_spec,
    list_specs,
    load_spec_file,
    make_spec,
    register_spec,
    spec_from_dict,
)
from kptjax.keypoints.spec import KeypointSpec

__all__ = ["KeypointSpec", "get_spec", "list_specs", "load_spec_file", "make_spec",
           "register_spec", "spec_from_dict"]
