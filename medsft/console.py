"""What the scripts print: columns padded by display width (a Chinese character is two columns wide)."""
import unicodedata


def display_width(text: str) -> int:
    """Terminal columns of `text`: wide and full-width characters (CJK, 。) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1
               for ch in str(text))


def pad(text, width: int, align: str = "<") -> str:
    """`text` padded with spaces to `width` display columns (left-aligned, or right-aligned with '>')."""
    text = str(text)
    fill = " " * max(0, width - display_width(text))
    return fill + text if align == ">" else text + fill


def markdown_table(header: list, rows: list[list], align: list | None = None) -> str:
    """A markdown table whose columns line up in a terminal, Chinese text included."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(header))]
    align = align or ["<"] * len(header)

    def line(row):
        return "| " + " | ".join(pad(c, w, a) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def text_table(header: list, rows: list[list]) -> str:
    """Plain columns (no rules) padded by display width."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(pad(c, w) for c, w in zip(row, widths)).rstrip() for row in cells)


# Known noise, each harmless here: (warning category, message regex)
KNOWN_NOISE = [
    # transformers >= 5.20 renamed gradient checkpointing; peft and older-compatible calls still use the old names
    (FutureWarning, r"`(is_)?gradient_checkpointing\w*` is deprecated"),
    # the DataLoader's default on a machine without a GPU
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    # bitsandbytes on CPU runs paged AdamW unpaged, which is what we want there
    (UserWarning, r"Paged optimizers are not supported on CPU"),
]


class _DropMessages:
    """A logging filter that drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes):
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Silence the warnings every run printed and that say nothing about the run; real warnings still show."""
    import logging
    import warnings

    for category, pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # bitsandbytes on CPU looks for an optional Hub kernel package and falls back to its own kernel
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # torchao (imported by peft when installed) tries its CUDA-only extensions on any machine
    logging.getLogger("torchao").addFilter(_DropMessages("Failed to load "))
    logging.getLogger("torch.utils._pytree").addFilter(_DropMessages("<enum "))
