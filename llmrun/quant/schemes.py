"""What a model's weights are held as: the weight modes, int4 kinds, group sizes and output
head schemes, their defaults, and the Scheme a loaded model runs (torch-free: the CLI's
parsers read them)."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

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

GROUP_SIZES = (0, 32, 64, 128, 256)
# Default: groups of 32. Per output channel (0) was what users asked for, but on the shipped
# models it more than doubles perplexity where g32 costs 22-37% (docs/eval.md); per channel
# stays selectable with --group-size 0.
DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class Scheme:
    """How a model's weights are held: float (quant none), or int4 layers with a head scheme,
    a GGUF's own block formats run as shipped (weights as-shipped) or re-rounded to int4."""

    quant: str = "none"  # none | int4
    group_size: int = DEFAULT_GROUP_SIZE  # int4: 0 = per output channel
    head: str = DEFAULT_HEAD  # llmrun.quant.schemes
    weights: str = DEFAULT_WEIGHTS  # as-shipped | int4
    int4: str = DEFAULT_INT4  # asymmetric | symmetric
    shipped_formats: tuple[str, ...] = ()  # the GGUF block formats run as shipped, most bytes first

    @property
    def label(self) -> str:
        """Which weights run, for people: the dtype (given), the int4 scheme, or the formats."""
        if self.shipped_formats:
            return f"as shipped ({', '.join(self.shipped_formats)})"
        return "int4 per-channel" if self.group_size == 0 else f"int4 g{self.group_size} {self.int4}"

    @classmethod
    def of_quantized_dir(cls, path) -> "Scheme":
        from llmrun.formats import quantized_dir

        return cls.from_dict(quantized_dir.read_scheme(path))

    @classmethod
    def from_dict(cls, s: dict) -> "Scheme":
        """As to_dict wrote it (or an older quantized directory, which lacks later fields)."""
        return cls(quant=s["quant"], group_size=int(s["group_size"]), head=s.get("head", "int8"),
                   weights=s.get("weights", "int4"),  # v1 directories: int4
                   int4=s.get("int4", "symmetric"),  # older directories: symmetric
                   shipped_formats=tuple(s.get("shipped_formats", ())))

    def to_dict(self, source: str) -> dict:
        """As a quantized directory records it (quantized_dir.save_quantized)."""
        return {**asdict(self), "shipped_formats": list(self.shipped_formats), "source": source}
