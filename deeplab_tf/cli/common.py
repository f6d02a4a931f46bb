"""What every command-line tool shares, in one place: its parser, the argument groups
several tools take (inference, CRF, outputs, dataset building), the parsing of list
flags, the one-line error wrapper and the installed entry point.

Each tool (``cli/*.py``) is ``parse_args`` -> one package call -> exit code. Every
``main`` is wrapped by ``handles_errors``, which turns any exception into one line of
at most ``MAX_ERROR_CHARS`` on stderr (exit code 2 for bad input, 1 for anything
unexpected); ``--verbose`` adds the traceback. Importing this module does not import
TensorFlow: the groups that need the package import it when called.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deeplab_tf.console import VERBOSE_HELP, filter_stderr

MAX_ERROR_CHARS = 200


def run(main: Callable[[], int | None]) -> int:
    """Runs a command-line tool's ``main`` with TensorFlow's log lines filtered out."""
    filter_stderr()
    return main() or 0


def entry_point(main: Callable[[], int | None]) -> Callable[[], None]:
    """The installed script of a tool (``[project.scripts]``): runs ``main`` and exits
    with its code."""

    def cli() -> None:
        sys.exit(run(main))

    return cli


# === Errors ===

# TensorFlow's runtime errors by class name (this module does not import TensorFlow):
# what the user can do about each.
_TENSORFLOW_ERRORS = {
    "DataLossError": "corrupt or truncated data",
    "ResourceExhaustedError": "out of memory (try a smaller --batch-size or --crop-size)",
    "NotFoundError": "not found",
    "InvalidArgumentError": "invalid input",
}


# TensorFlow's node context after a runtime error's message ("[[{{node ...}}]]").
_OP_CONTEXT = re.compile(r"\s*\[\[.*")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' error form: a bad flag is one line on stderr (not the
    usage block) and exit code 2; ``--help`` names the TensorFlow log switch."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("epilog", VERBOSE_HELP)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's hook; never returns
        text = " ".join(message.split())
        self.exit(2, f"error: {text} (see {self.prog} --help)\n"[: MAX_ERROR_CHARS + 1])


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: the traceback of an error as well as its one line."""
    parser.add_argument(
        "--verbose", action="store_true", help="show the full traceback of an error"
    )


def error_line(error: BaseException) -> str:
    """``error`` as one line of at most ``MAX_ERROR_CHARS`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    name = type(error).__name__
    if name in _TENSORFLOW_ERRORS and type(error).__module__.startswith("tensorflow"):
        text = f"{_TENSORFLOW_ERRORS[name]}: {_OP_CONTEXT.sub('', text)}"
    limit = MAX_ERROR_CHARS - len("error: ")
    if len(text) > limit:  # long paths lose their middle directories first
        text = _PATH.sub(lambda m: _short_path(m.group(0)), text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# An absolute path in a message (up to a space, colon, quote or bracket).
_PATH = re.compile(r"/[^\s:'\"()\[\]]+")


def _short_path(path: str) -> str:
    """``/first/.../parent/name`` for a long path: where it is and what it is."""
    parts = path.split("/")
    if len(path) <= 40 or len(parts) <= 4:
        return path
    return "/".join([*parts[:2], "...", *parts[-2:]])


def _is_bad_input(error: BaseException) -> bool:
    tensorflow = type(error).__module__.startswith("tensorflow")
    return isinstance(error, (ValueError, OSError)) or (
        tensorflow and type(error).__name__ in _TENSORFLOW_ERRORS
    )


def handles_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a tool's ``main(argv)``: an exception becomes one line on stderr and exit
    code 2 (bad input: ValueError and its subclasses, OSError, TensorFlow's data and
    resource errors) or 1 (anything else, a bug to report); ``--verbose`` in argv also
    prints the traceback."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else [str(a) for a in argv]
        try:
            return main(argv) or 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if "--verbose" in args:
                traceback.print_exc()
            if _is_bad_input(error):
                print(f"error: {error_line(error)}", file=sys.stderr, flush=True)
                return 2
            hint = " (run with --verbose for the traceback)" if "--verbose" not in args else ""
            line = error_line(error)[: MAX_ERROR_CHARS - 60]
            print(f"internal error: {type(error).__name__}: {line}{hint}", file=sys.stderr)
            return 1

    return wrapper


# === Parsers ===


def tool_parser(doc: str) -> ArgumentParser:
    """A tool's parser: the first line of its module docstring as the description;
    ``--help`` names the TensorFlow log switch."""
    return ArgumentParser(
        description=doc.splitlines()[0],
        epilog=VERBOSE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Adds ``--verbose`` (every tool's last flag) and parses ``argv``."""
    add_verbose_argument(parser)
    return parser.parse_args(argv)


# === Argument groups ===


def add_output_arguments(
    parser: argparse.ArgumentParser,
    output_help: str,
    overwrite_help: str = "replace an existing output dir",
    **output_dir: Any,
) -> None:
    """``--output-dir`` (``output_dir``: more ``add_argument`` keywords), ``--overwrite``
    and ``--quiet``."""
    parser.add_argument("--output-dir", help=output_help, **output_dir)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The output flags of the dataset builders (``build_*.py``)."""
    add_output_arguments(
        parser, "TFRecord directory", "replace existing splits", required=True, type=Path
    )
    parser.add_argument("--num-shards", type=int, default=None, help="default: 256 images/shard")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad pairs with a warning")


def build_options(args: argparse.Namespace) -> dict[str, Any]:
    """``data.build.build_split``'s keywords from ``add_build_arguments``' flags."""
    return {"num_shards": args.num_shards, "skip_bad": args.skip_bad,
            "overwrite": args.overwrite, "progress": not args.quiet}  # fmt: skip


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """The inference flags of ``evaluate.py``, ``predict.py`` and ``tune_crf.py``."""
    from deeplab_tf.inference import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE, FUSIONS

    parser.add_argument(
        "--checkpoint",
        "--model-dir",
        dest="checkpoint",
        required=True,
        help="a training model directory (its best.keras, else last.keras) or a .keras file",
    )
    parser.add_argument("--variant", help="the checkpoint's variant (default: its config.json)")
    parser.add_argument(
        "--output-stride", type=int, choices=(8, 16, 32), help="rebuild at this stride"
    )
    parser.add_argument(
        "--scales", default="1", help="comma-separated, e.g. 0.5,0.75,1,1.25,1.5,1.75, or v3"
    )
    parser.add_argument("--flip", action="store_true", help="add left-right flipped inputs")
    parser.add_argument(
        "--fusion", choices=FUSIONS, default="mean", help="mean of probabilities (v3) or max (v2)"
    )
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="window size")
    parser.add_argument("--tile-overlap", type=float, default=DEFAULT_TILE_OVERLAP)
    parser.add_argument("--whole-image", action="store_true", help="never use sliding windows")
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile inference")
    add_precision_argument(parser)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    from deeplab_tf.precision import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="bfloat16: about 2.5x faster on CPUs with AVX512_BF16 or AMX (float32 elsewhere)",
    )


def predictor_from_args(args: argparse.Namespace):
    """The ``inference.Predictor`` of ``add_predictor_arguments``' flags."""
    from deeplab_tf.inference import Predictor

    return Predictor(
        args.checkpoint,
        variant=args.variant,
        output_stride=args.output_stride,
        scales=parse_scales(args.scales),
        flip=args.flip,
        fusion=args.fusion,
        tiling="whole" if args.whole_image else "sliding",
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        jit_compile=args.jit_compile,
        precision=args.precision,
    )


def add_crf_arguments(
    parser: argparse.ArgumentParser, workers: bool = True, switch: bool = True
) -> None:
    """``--crf``, ``--crf-params FILE`` (implies ``--crf``), ``--crf-backend`` and, with
    ``workers``, ``--crf-workers``; ``switch=False`` leaves out the first two."""
    from deeplab_tf.crf import BACKENDS

    if switch:
        parser.add_argument(
            "--crf", action="store_true", help="refine with the dense CRF (v1/v2 post-processing)"
        )
        parser.add_argument(
            "--crf-params",
            metavar="FILE",
            help="CRF parameters JSON (tune_crf.py's output); implies --crf (default: CRFParams())",
        )
    parser.add_argument(
        "--crf-backend", choices=BACKENDS, default="auto", help="auto: pydensecrf if installed"
    )
    if workers:
        parser.add_argument(
            "--crf-workers", type=int, help="images refined at once (default: the CPU count)"
        )


def crf_params_from_args(args: argparse.Namespace):
    """The ``crf.CRFParams`` asked for by ``add_crf_arguments``' flags, or None without
    CRF. Raises a one-line ``ValueError`` naming the file or flag at fault."""
    from deeplab_tf.crf import CRFParams

    positive(getattr(args, "crf_workers", None), "--crf-workers")
    if getattr(args, "crf_params", None):
        return CRFParams.load(args.crf_params)
    return CRFParams() if getattr(args, "crf", False) else None


# === Values of flags ===


def positive(value: int | None, flag: str) -> None:
    """Refuses a number below 1 given for ``flag`` (None: not given)."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be positive, got {value}")


def parse_scales(text: str) -> tuple[float, ...]:
    """``--scales``: comma-separated positive numbers, or ``v3`` for 0.5..1.75."""
    from deeplab_tf.inference import V3_EVAL_SCALES

    if text == "v3":
        return V3_EVAL_SCALES
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {text!r}") from None
    if any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"--scales must be positive, got {text!r}")
    return scales


def parse_int_list(text: str | None, flag: str) -> tuple[int, ...]:
    """Comma-separated integers (``--trimap``, ``--oversample-classes``); () if not given."""
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_class_weights(text: str | None) -> tuple[float, ...] | str | None:
    """``--class-weights``: comma-separated numbers or a method name."""
    from deeplab_tf.losses import CLASS_WEIGHT_METHODS

    if text is None or text in CLASS_WEIGHT_METHODS:
        return text
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            "--class-weights must be comma-separated numbers or one of "
            f"{list(CLASS_WEIGHT_METHODS)}"
        ) from None
