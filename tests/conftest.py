import os

from hypothesis import settings

# CI runs the same examples every time; locally hypothesis keeps exploring.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

import dlrm_ops  # noqa: F401  (loads the native ops)
