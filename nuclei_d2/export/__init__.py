"""Export to ONNX / TorchScript and running exported networks (issue 27; docs/export.md).

* :mod:`.exporter` — each network of a built, loaded model to one checked ``.onnx`` / ``.pt`` file;
* :mod:`.sidecar` — ``export.json``, what the files need around them (pre/post-processing), checked on load;
* :mod:`.runtime` — an export folder as ``{name: callable}`` for the model's ``set_runtime``;
* :mod:`.quantize` — static int8 quantisation of an exported ONNX network on recorded calibration inputs.

The contract the models implement is :mod:`nuclei_d2.modeling.networks`; tools go through
:mod:`nuclei_d2.engine.export`.
"""

from .exporter import ONNX_OPSET, export_network, export_networks, exportable_networks
from .quantize import QUANTIZATIONS, quantize_onnx
from .runtime import RUNTIME_FORMAT, RUNTIMES, ExportedNetwork, check_runtime_config, install_runtime, load_runtime
from .sidecar import FORMATS, SIDECAR, ExportError, build_sidecar, read_sidecar, write_sidecar

__all__ = ["FORMATS", "ONNX_OPSET", "QUANTIZATIONS", "RUNTIMES", "RUNTIME_FORMAT", "SIDECAR", "ExportError",
           "ExportedNetwork", "build_sidecar", "check_runtime_config", "export_network", "export_networks",
           "exportable_networks", "install_runtime", "load_runtime", "quantize_onnx", "read_sidecar", "write_sidecar"]
