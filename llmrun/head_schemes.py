"""The weight modes and output head schemes (torch-free: the CLI's parsers read them)."""

import platform

HEAD_SCHEMES = ("int8", "int4-rescored", "int4", "none")
RUN_HEAD_SCHEMES = HEAD_SCHEMES[:-1]  # what generate/chat/eval/bench take ("none": quantize only)
# Default: the rescored head. Gemma 3 270M (a 262144 x 640 tied head, 168 of the 230 MB a token
# read): decode 110 -> 168 t/s; SmolLM2-135M (49152 x 576): equal within noise (233 vs 240 t/s);
# perplexity over 8192 tokens of alice29.txt +0.88% / +0.94%, greedy text the same (docs/eval.md).
DEFAULT_HEAD = "int4-rescored"
HEAD_HELP = ("the output head's scheme with --quant int4: int4-rescored (default): an int4 copy scores "
             "the vocabulary and each row's top 256 are recomputed from the int8 table; int8 per channel; "
             "int4 like the layers")

# What a quantized checkpoint's weights become with --quant int4. as-shipped (default): a GGUF
# file's Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 tensors run with their own codes and scales,
# bit-exact (float tensors take the int4 scheme); int4: every layer re-rounded to llmrun's int4
# (smaller and faster, lossy: SmolLM2 perplexity +26%, Gemma 3 270M +47%, docs/eval.md).
WEIGHT_MODES = ("as-shipped", "int4")
DEFAULT_WEIGHTS = "as-shipped"
WEIGHTS_HELP = ("as-shipped (default): a GGUF's quantized tensors run exactly as stored; int4: re-round "
                "every layer to int4 (smaller, faster, lossy)")

# How llmrun's int4 rounds a float weight in groups. asymmetric (default): a scale and an offset
# per group (ggml's make_qkx2_quants search), run by the block kernel with activations quantized
# per group of 32. Perplexity over 1024 tokens of alice29.txt (windows 512, stride 256; as
# shipped: SmolLM2 23.47, Gemma 3 270M 21.49): asymmetric 23.39 / 24.71; symmetric (per row
# activations, int4_mm) 29.57 / 33.86; symmetric with per-group activations 29.39 / 32.46;
# llama.cpp's own Q4_0 requantization of the Gemma file 32.62. Symmetric decodes ~7% faster
# (AVX2) to ~50% (AVX512-VNNI); per output channel (--group-size 0) is always symmetric. On Arm
# the default is symmetric: KleidiAI's ops take nothing else, and asymmetric groups would run on
# the slow reference there (docs/aarch64.md).
INT4_KINDS = ("asymmetric", "symmetric")
DEFAULT_INT4 = "symmetric" if platform.machine().lower() in ("aarch64", "arm64") else "asymmetric"
INT4_HELP = ("how int4 groups round a float weight: asymmetric (a scale and an offset per group, far "
             "closer to the model; the default on x86) or symmetric (a scale per group; faster, lossier; "
             "the default on Arm, whose KleidiAI kernels take only it)")
