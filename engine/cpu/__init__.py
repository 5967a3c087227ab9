"""The CPU backend: packed GGUF blocks, the C kernels that multiply by them, and the modules that carry them into
a model (engine/model.py stays the eager torch reference).

    packed.py       PackedLinear: one weight in a layout of qblocks.h, read from a GGUF's blocks
    kernels.py      the Python face of the C library (qmatmul, dequant, rmsnorm, decode_attention, lora_apply) and
                    their torch references
    library.py      builds the library with gcc (the build options in one place), checks it against cpu_kernels.h,
                    picks the ISA variant
    decode_step.py  a one-token step of every layer as one C call per layer
    modules.py      the modules swapped into a packed model (PackedProjection, PackedAttention, StepDecoder, ...)
    cpu_kernels.h   the one C interface; qblocks.h the block layouts; qmatmul*.c one file per ISA; cpu_ops.c the rest
"""
