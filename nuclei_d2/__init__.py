"""nuclei-d2: published nuclei instance-segmentation methods for H&E histopathology on Detectron2.

``import nuclei_d2`` registers every dataset, meta-architecture, head and backbone the package defines.

It also hides two warnings that third-party code prints on every run and a user cannot act on, each matched by its
message (never a blanket filter): torch's FutureWarning "``torch.jit.script`` is deprecated", raised while Detectron2
(``modeling/box_regression.py``) and fvcore (``nn/focal_loss.py``) are imported here, only during that import; and
torch's UserWarning about ``torch.meshgrid``'s missing ``indexing`` argument, raised by Detectron2's anchor generator
at every first forward pass (our own code passes ``indexing``).
"""

import warnings as _warnings

_warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release, it will be required to pass "
                         r"the indexing argument", category=UserWarning, module=r"torch\.functional")

with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                             module=r"torch\.jit\._script")
    import detectron2.modeling  # noqa: F401  (scripts two functions at import)
    import fvcore.nn  # noqa: F401  (idem)

    from . import data, modeling  # noqa: F401  (importing them registers datasets and models)
    from .config import add_nuclei_config  # noqa: F401
    from .version import __version__  # noqa: F401
