"""fewstep_kernels: fused GPU kernels for fewstep (filled by the attention-JVP issue)."""
