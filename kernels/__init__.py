"""kvwire KV codec: transform, quantization, entropy coding and the bitstream format (CPU and GPU paths)."""
