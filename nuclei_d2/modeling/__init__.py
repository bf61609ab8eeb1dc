"""Meta-architectures, heads and backbones, registered in Detectron2's registries on import."""
