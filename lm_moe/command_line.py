"""How every entry point reports bad input: `<prog>: error: <what is wrong, the bad value, what is
allowed>` on one line of stderr, exit status 2, no traceback. An internal failure keeps its
traceback (and Python's exit status 1; the causality report, whose 1 means a leak, uses 3)."""

import argparse
import inspect
import re
import sys
from typing import NoReturn

import jsonargparse

BAD_INPUT = 2

# jsonargparse explains why a value fits none of a union's types (an FFN setting is "a layer class
# or None") over a dozen lines; the reason for the class is the one a user needs.
_CLASS_REASON = re.compile(r"expects a function or a callable class: (.*?)(?:\.+ Got value: .*)?$", re.MULTILINE)
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"class_path='([\w.]+)'")
LAYER_SETTING = "ffn"  # the model setting that takes an FFN layer class, in both models


def ffn_layers() -> dict[str, type]:
    """lm_moe's FFN layer classes by name."""
    import lm_moe.layers as layers  # the layers import torch: only when an error needs them

    classes = {name: getattr(layers, name) for name in layers.__all__}
    return {name: cls for name, cls in classes.items()
            if isinstance(cls, type) and issubclass(cls, layers.FeedForwardLayer) and cls is not layers.FeedForwardLayer}


def _layer_reason(reason: str, message: str) -> str:
    """An FFN setting's reason, with the layer's options (an option it does not take) or the layers."""
    class_path = _CLASS_PATH.search(message)
    layer = ffn_layers().get(class_path[1].removeprefix("lm_moe.layers.")) if class_path else None
    if layer is not None and reason.startswith("Option "):
        options = [name for name in inspect.signature(layer).parameters if name != "dim"]
        return f"{reason} by {class_path[1]} (its options: {', '.join(options)})"
    return f"{reason} (the FFN layers: lm_moe.layers.{{{', '.join(ffn_layers())}}}, or a FeedForwardLayer subclass of your own)"


def one_line(message: str) -> str:
    """A parser's message as one line, `<key>: <reason>`: a union type's failure reduced to the
    reason for the class."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    key, reasons = _PARSER_KEY.match(lines[0]) if lines else None, _CLASS_REASON.findall(message)
    if key and reasons:
        reason = reasons[0].rstrip(".")
        if key[1].rsplit(".", 1)[-1] == LAYER_SETTING:
            reason = _layer_reason(reason, message)
        return f"{key[1]}: {reason}"
    return _PARSER_KEY.sub(r"\1:", " ".join(lines))


def exit_with_error(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.exit(BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(self.prog, message)


class OneLineErrors:
    """For jsonargparse parsers (the Lightning CLI's, sample's): the one-line error, under the
    program's name, where jsonargparse prints the whole usage and a multi-line explanation."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parse: the parser above reports it
            return super().error(message, ex)
        exit_with_error(self.prog.split(" [options]")[0], message)


class JsonArgumentParser(OneLineErrors, jsonargparse.ArgumentParser):
    pass
