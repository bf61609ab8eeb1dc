"""Generic helpers with no knowledge of models or datasets: image/label I/O, atomic writes, reading JSON.

The bottom layer of the package (docs/architecture.md): it imports nothing else from ``nuclei_d2``.
"""
