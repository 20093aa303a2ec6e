"""The prompt language: what people type after ``/imagine``, turned into recipes.

    a lighthouse at dusk --ar 3:2 --seed 7 --no people, boats --style watercolor:0.8

Grammar, in order of application:

1. ``—`` (the em dash phones make of ``--``) that starts a word is read as ``--``; one
   on its own (``a lighthouse — at dusk``) or inside a word is punctuation.
2. ``{a, b}`` permutations expand the whole text into one text per option
   (nesting allowed; braces must balance; prompts cannot hold literal braces).
3. In each text, a ``--name`` that starts a word opens a flag; its value runs to
   the next flag. ``--`` inside a word (``foo--bar``) is plain text. The text
   before the first flag is the prompt, with white space collapsed.
4. ``--iw X`` (0 to 2) weighs the image prompt; it needs one. The image itself is not
   text: it comes as an attachment, or as a Discord link at the very start of the
   prompt, which :func:`take_image_url` removes before parsing (Midjourney's form).
5. ``--control TYPE[,TYPE]`` (canny, depth, pose, lineart, scribble, tile; ``TYPE:raw`` for
   a map made already) steers the structure from an image: the ``control`` attachment,
   or else the image prompt, which then only steers the structure unless ``--iw`` is
   given too. ``--cw``, ``--cstart`` and ``--cend`` take one value for every control or
   one per control, comma-separated.
6. ``--repeat N`` runs the text N times with new seeds (with ``--seed``, each run
   starts past the seeds of the run before: :func:`storage.recipe.repeat_seed`).
   At most :data:`MAX_GENERATIONS` in all.

Values a command takes as typed options (``/imagine``'s seed, aspect ratio, style and
negative fields; a member's ``/settings`` defaults) never pass through the text: they
come as :class:`PromptOverrides`, checked with the same sentences as the flags.
Precedence, lowest first: the family's defaults, ``fallbacks`` (a member's defaults),
the flags in the text, ``overrides`` (the command's options). An option replaces the
same flag in the text, because it is the value the member chose last (often over a
pasted ``/info`` prompt); styles add up, and a style named in both keeps the option's
weight.

:func:`format_recipe` writes a recipe back as text that parses to the same recipe (given
the same image prompt, which is not text).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from storage.controls import (
    CONTROL_TYPES,
    MAX_CONTROL_WEIGHT,
    MAX_CONTROLS,
    ControlError,
    ControlRef,
    check_controls,
    make_control,
)
from storage.derive import with_image_prompt
from storage.errors import ImagineError
from storage.families import ModelFamily, size_for
from storage.recipe import (
    MAX_IMAGE_WEIGHT,
    MAX_SEED,
    ImageRef,
    Recipe,
    StyleRef,
    repeat_seed,
    shortened,
    unknown_style_message,
)
from storage.recipe import random_seed as fresh_seed
from storage.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES
from storage.style_store import STYLE_NAME

MAX_GENERATIONS = 10
MAX_PROMPT_LENGTH = 1500
MAX_GROUPS = 20
MAX_RATIO = 4.0
MAX_SIDE_UNITS = 100
SAMPLERS = SAMPLER_NAMES  # the one list: storage/samplers.py
FLAGS: tuple[str, ...] = (
    "ar",
    "seed",
    "no",
    "steps",
    "cfg",
    "guidance",
    "sampler",
    "style",
    "iw",
    "control",
    "cw",
    "cstart",
    "cend",
    "repeat",
)
# How a control steers: lowest, highest, default.
_CONTROL_TUNING = {
    "cw": (0.0, MAX_CONTROL_WEIGHT, 1.0),
    "cstart": (0.0, 1.0, 0.0),
    "cend": (0.0, 1.0, 1.0),
}
_ALIASES = {"guidance": "cfg", "aspect": "ar"}
_FLAG = re.compile(r"(?<!\S)--(\S*)")
_PHONE_DASH = re.compile(r"(?<!\S)—(?=\S)")  # the em dash a phone made of a flag's --
_RATIO = re.compile(r"^(\d{1,3}):(\d{1,3})$")
_WHOLE = re.compile(r"^\d{1,10}$")
_URL = re.compile(r"^<?[A-Za-z][A-Za-z0-9+.-]*://\S*$")


class PromptError(ImagineError):
    """Text that is not a valid prompt; the message says what to change."""

    def __init__(self, message: str, *, flag: str = "", value: str = "", allowed: str = "") -> None:
        super().__init__(message)
        self.flag = flag
        self.value = value
        self.allowed = allowed


@dataclass(frozen=True)
class PromptDefaults:
    model: str
    family: ModelFamily
    count: int = 4
    sampler: str = DEFAULT_SAMPLER
    style_weights: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptOverrides:
    """Typed values of a command's own options, each standing for the flag it names.

    ``styles`` hold ``name`` or ``name:weight``, as ``--style`` takes them.
    """

    aspect_ratio: str | None = None
    seed: int | None = None
    negative: str | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    styles: tuple[str, ...] = ()

    @classmethod
    def from_user_defaults(cls, values: Mapping[str, object]) -> PromptOverrides:
        """A member's ``/settings`` defaults (as stored) as values for ``fallbacks``."""

        def text(key: str) -> str | None:
            value = values.get(key)
            return None if value is None else str(value)

        steps, guidance, style = values.get("steps"), values.get("guidance"), text("style")
        return cls(
            aspect_ratio=text("aspect_ratio"),
            steps=int(steps) if isinstance(steps, int | float) else None,
            cfg=float(guidance) if isinstance(guidance, int | float) else None,
            styles=(style,) if style else (),
        )


def unknown_default_style(fallbacks: PromptOverrides, known: Collection[str]) -> str | None:
    """The member's default style, if it is not one of the ``known`` styles where the prompt
    runs (defaults are per member, styles per server): the prompt runs without it."""
    for value in fallbacks.styles:
        name = value.partition(":")[0].strip()
        if name not in known:
            return name
    return None


def _shown(value: str) -> str:
    return shortened(value, 40)


def _refuse(flag: str, value: str, allowed: str) -> PromptError:
    if not value:
        message = f"--{flag} needs a value: {allowed}."
    else:
        message = f"--{flag} {_shown(value)} is not allowed: {allowed}."
    return PromptError(message, flag=f"--{flag}", value=value, allowed=allowed)


# -- a leading image link ------------------------------------------------------------------


def take_image_url(
    text: str, is_allowed: Callable[[str], bool], allowed: str = "Discord"
) -> tuple[str | None, str]:
    """The image link a prompt starts with (``None`` if none) and the text after it.

    ``is_allowed`` says whether a link is on an origin Imagine fetches from (``allowed``
    names them in the sentence refusing another).
    """
    words = text.split(maxsplit=2)
    if not words or not _URL.fullmatch(words[0]):
        return None, text
    url = words[0].removeprefix("<").removesuffix(">")
    if not is_allowed(url):
        raise PromptError(
            f"Imagine only fetches images from {allowed}; attach the image to the command, "
            "or start the prompt with its Discord link.",
            flag="image",
            value=_shown(url),
            allowed=f"an image on {allowed}",
        )
    rest = text.split(maxsplit=1)[1] if len(words) > 1 else ""
    if rest.split() and _URL.fullmatch(rest.split()[0]):
        raise PromptError(
            "Only one image prompt is taken at a time; keep one link at the start.",
            flag="image",
            value=_shown(rest.split()[0]),
            allowed="one image link",
        )
    return url, rest


# -- permutations ---------------------------------------------------------------------------


def _unbalanced(text: str) -> PromptError:
    return PromptError(
        "A { or } has no partner; write permutations as {red, blue} "
        "(prompts cannot contain other braces).",
        flag="{}",
        value=_shown(text),
        allowed="balanced {a, b} groups",
    )


def _first_group(text: str) -> tuple[int, int, list[str]] | None:
    """(start, end, options) of the first outermost ``{...}``, options split on top-level commas."""
    start = text.find("{")
    stray = text.find("}")
    if start < 0:
        if stray >= 0:
            raise _unbalanced(text)
        return None
    if 0 <= stray < start:
        raise _unbalanced(text)
    depth, options, piece = 0, [], start + 1
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                options.append(text[piece:index])
                return start, index + 1, options
        elif char == "," and depth == 1:
            options.append(text[piece:index])
            piece = index + 1
    raise _unbalanced(text)


def _expand(text: str) -> list[str]:
    """Every text that ``{a, b}`` permutations make of ``text``, in reading order."""
    group = _first_group(text)
    if group is None:
        return [text]
    start, end, options = group
    head, tail = text[:start], text[end:]
    expanded: list[str] = []
    for option in options:
        expanded.extend(_expand(head + option.strip() + tail))
        if len(expanded) > MAX_GENERATIONS:
            raise _too_many(len(expanded))
    return expanded


def _too_many(count: int) -> PromptError:
    allowed = f"at most {MAX_GENERATIONS} generations from one prompt"
    return PromptError(
        f"This prompt makes {count} or more generations with its {{}} permutations and "
        f"--repeat; {allowed}.",
        flag="--repeat",
        value=str(count),
        allowed=allowed,
    )


# -- flags -----------------------------------------------------------------------------------


def _dashes(text: str) -> str:
    """``text`` with each em dash that starts a word (``—ar``) read as ``--``."""
    return _PHONE_DASH.sub("--", text)


def asks_for_control(text: str) -> bool:
    """Whether ``text`` has a ``--control`` flag: a remix keeps the control image of what
    it remixes only while its text still asks for a control."""
    return any(name == "control" for name, _ in _split(_dashes(text))[1])


def _split(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The prompt and the (flag, value) pairs of one permutation."""
    matches = list(_FLAG.finditer(text))
    prompt = text[: matches[0].start()] if matches else text
    flags = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        name, equals, inline = match.group(1).partition("=")
        value = (inline + text[match.end() : end]) if equals else text[match.end() : end]
        flags.append((name.lower(), " ".join(value.split())))
    return " ".join(prompt.split()), flags


def _whole(flag: str, value: str, low: int, high: int) -> int:
    allowed = f"a whole number from {low} to {high}"
    if not _WHOLE.fullmatch(value) or not low <= int(value) <= high:
        raise _refuse(flag, value, allowed)
    return int(value)


def _number(flag: str, value: str, low: float, high: float) -> float:
    allowed = f"a number from {low:g} to {high:g}"
    try:
        number = float(value)
    except ValueError:
        raise _refuse(flag, value, allowed) from None
    if not math.isfinite(number) or not low <= number <= high:
        raise _refuse(flag, value, allowed)
    return number


def _control_types(value: str) -> list[tuple[str, bool]]:
    """``--control canny,depth:raw``: each control's type, and whether its image is a map."""
    allowed = (
        f"one or {MAX_CONTROLS} of {', '.join(CONTROL_TYPES)}, comma-separated; add :raw to use "
        "the image as the map itself (a pose skeleton, a depth map you made)"
    )
    chosen: list[tuple[str, bool]] = []
    for part in value.split(","):
        kind, colon, mode = part.strip().lower().partition(":")
        if kind not in CONTROL_TYPES or (colon and mode != "raw"):
            raise _refuse("control", part.strip(), allowed)
        if any(kind == other for other, _ in chosen):
            raise _refuse("control", value, "each control type once")
        chosen.append((kind, bool(colon)))
    if len(chosen) > MAX_CONTROLS:
        raise _refuse("control", value, allowed)
    return chosen


def _controls(
    values: _Values, source: str | None, expected: bool, attached: bool
) -> tuple[ControlRef, ...]:
    """The controls the flags ask for, from the image ``source`` (a blob key); none while
    the image is still to be fetched (``expected``). A control image ``attached`` with no
    ``--control`` is refused: nothing would say what to take from it."""
    chosen = values.get("control")
    tuning = {name: values.get(name) for name in _CONTROL_TUNING}
    if not chosen and attached:
        raise PromptError(
            "A control image says nothing by itself; add --control with what to take from "
            f"it: {', '.join(CONTROL_TYPES)} (for example --control canny for its edges).",
            flag="--control",
            value="",
            allowed=", ".join(CONTROL_TYPES),
        )
    if not chosen:
        for name, given in tuning.items():
            if given is not None:
                raise PromptError(
                    f"--{name} tunes a control, and there is none; add --control canny "
                    f"(or {', '.join(CONTROL_TYPES[1:])}).",
                    flag=f"--{name}",
                    value=",".join(f"{v:g}" for v in given),  # type: ignore[attr-defined]
                    allowed="a --control to tune",
                )
        return ()
    assert isinstance(chosen, list)
    if source is None:
        if expected:
            return ()
        raise PromptError(
            f"--control {chosen[0][0]} takes the structure from an image, and there is none; "
            "attach one as the control option (or as the image prompt).",
            flag="--control",
            value=",".join(kind for kind, _ in chosen),
            allowed="an image to take the structure from",
        )
    per_control: dict[str, list[float]] = {}
    for name, (_low, _high, default) in _CONTROL_TUNING.items():
        given = tuning[name]
        numbers: list[float] = given if isinstance(given, list) else [default]
        if len(numbers) not in (1, len(chosen)):
            raise PromptError(
                f"--{name} has {len(numbers)} values for {len(chosen)} controls; give one for "
                "all of them or one per control, in the order of --control.",
                flag=f"--{name}",
                value=",".join(f"{n:g}" for n in numbers),
                allowed=f"1 or {len(chosen)} values",
            )
        per_control[name] = numbers * len(chosen) if len(numbers) == 1 else numbers
    refs = []
    try:
        for index, (kind, raw) in enumerate(chosen):
            refs.append(
                make_control(
                    kind,
                    weight=per_control["cw"][index],
                    start=per_control["cstart"][index],
                    end=per_control["cend"][index],
                    raw=raw,
                    source_key=source,
                )
            )
        check_controls(tuple(refs))
    except ControlError as exc:
        raise PromptError(
            str(exc), flag="--control", value=kind, allowed="see the sentence"
        ) from None
    return tuple(refs)


def _ratio(value: str) -> tuple[int, int]:
    allowed = (
        f"W:H with whole numbers from 1 to {MAX_SIDE_UNITS} and a ratio between "
        f"1:{MAX_RATIO:g} and {MAX_RATIO:g}:1 (for example --ar 3:2)"
    )
    match = _RATIO.fullmatch(value)
    if match is None:
        raise _refuse("ar", value, allowed)
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= MAX_SIDE_UNITS and 1 <= height <= MAX_SIDE_UNITS):
        raise _refuse("ar", value, allowed)
    if not 1 / MAX_RATIO <= width / height <= MAX_RATIO:
        raise _refuse("ar", value, allowed)
    divisor = math.gcd(width, height)
    return width // divisor, height // divisor


def _style(value: str, defaults: PromptDefaults, known: Collection[str] | None) -> StyleRef:
    allowed = "a style name, optionally :weight from -2 to 2 (for example --style watercolor:0.8)"
    name, colon, weight_text = value.partition(":")
    if not STYLE_NAME.fullmatch(name):
        raise _refuse("style", value, allowed)
    if known is not None and name not in known:
        raise PromptError(
            unknown_style_message(name, known)[0],
            flag="--style",
            value=value,
            allowed="one of the server's styles",
        )
    if colon:
        try:
            weight = _number("style", weight_text, -2.0, 2.0)
        except PromptError:
            raise _refuse("style", value, allowed) from None
    else:
        weight = defaults.style_weights.get(name, 1.0)
    return StyleRef(name=name, weight=weight)


def _negative(value: str) -> str:
    items = [" ".join(item.split()) for item in value.split(",")]
    negative = ", ".join(item for item in items if item)
    if not negative:
        raise _refuse("no", value, "what to leave out, for example --no people, text")
    if _FLAG.search(_dashes(negative)):  # "--no dogs,--seed 5": the seed would be lost in it
        raise _refuse(
            "no",
            value,
            "what to leave out; a flag after it needs a space before its --, as in "
            "--no dogs --seed 5",
        )
    return negative


def _sampler(value: str) -> str:
    if value.lower() not in SAMPLER_NAMES:
        raise _refuse("sampler", value, "one of " + ", ".join(SAMPLER_NAMES))
    return value.lower()


# Flag values checked once, before any text: the name of the flag → its value.
_Values = dict[str, object]


_TYPED_FLAGS = frozenset({"ar", "seed", "no", "steps", "cfg", "sampler", "style"})


def _typed(
    overrides: PromptOverrides,
    defaults: PromptDefaults,
    known: Collection[str] | None,
    wanted: Collection[str] = _TYPED_FLAGS,
) -> tuple[_Values, list[StyleRef]]:
    """Typed option values for the ``wanted`` flags, checked with the sentences of those flags."""
    values: _Values = {}
    if overrides.aspect_ratio is not None and "ar" in wanted:
        values["ar"] = _ratio(overrides.aspect_ratio.strip())
    if overrides.seed is not None and "seed" in wanted:
        values["seed"] = _whole("seed", str(overrides.seed), 0, MAX_SEED)
    if overrides.negative is not None and overrides.negative.strip() and "no" in wanted:
        negative = _dashes(overrides.negative)
        # A recipe must write back as prompt text (remix, /info): no flags, no braces.
        if _FLAG.search(negative) or "{" in negative or "}" in negative:
            raise _refuse("no", negative, "what to leave out, without --flags or {} braces")
        values["no"] = _negative(negative)
    if overrides.steps is not None and "steps" in wanted:
        values["steps"] = _whole("steps", str(overrides.steps), 1, 150)
    if overrides.cfg is not None and "cfg" in wanted:
        values["cfg"] = _number("cfg", repr(float(overrides.cfg)), 0.0, 30.0)
    if overrides.sampler is not None and "sampler" in wanted:
        values["sampler"] = _sampler(overrides.sampler.strip())
    styles: list[StyleRef] = []
    for value in overrides.styles if "style" in wanted else ():
        _add_style(styles, _style(value.strip(), defaults, known), value)
    return values, styles


def _add_style(styles: list[StyleRef], ref: StyleRef, value: str) -> None:
    if any(style.name == ref.name for style in styles):
        raise PromptError(
            f"The style {ref.name} is given twice; give each style once.",
            flag="--style",
            value=value,
            allowed="each style once",
        )
    styles.append(ref)


def _unknown_flag(name: str) -> PromptError:
    known = ", ".join(f"--{flag}" for flag in FLAGS)
    close = difflib.get_close_matches(name, [*FLAGS, *_ALIASES], n=1)
    hint = f" Did you mean --{close[0]}?" if close else ""
    shown = f"--{_shown(name)}" if name else "--"
    return PromptError(
        f"{shown} is not a flag Imagine knows; the flags are {known}.{hint}",
        flag=shown,
        value="",
        allowed=known,
    )


def _refuse_unhonoured(values: _Values, family: ModelFamily) -> None:
    """Flags the model family cannot honour, refused with the family's own sentence."""
    for flag, value in values.items():
        reason = family.refusal(flag)
        if reason is not None and not (flag == "sampler" and value == DEFAULT_SAMPLER):
            raise PromptError(reason, flag=f"--{flag}", value=str(value), allowed="leave it out")


def _check_t5_length(prompt: str, family: ModelFamily) -> None:
    """Refuse a prompt surely longer than the family's T5 reads: every word is at least
    one token, plus the end-of-text token. The worker counts exactly (styles' words
    included) and refuses the rest; neither ever cuts a prompt silently."""
    limit = family.max_sequence_length
    words = len(prompt.split())
    if limit is not None and words + 1 > limit:
        raise PromptError(
            f"The prompt is {words} words long, but {family.shown_name} reads at most "
            f"{limit} T5 tokens (a word is a token or more) and Imagine does not cut prompts "
            f"silently; shorten it to well under {limit - 1} words.",
            flag="prompt",
            value=_shown(prompt),
            allowed=f"at most {limit} T5 tokens",
        )


def _parse_one(
    text: str,
    defaults: PromptDefaults,
    draw: Callable[[], int],
    known_styles: Collection[str] | None,
    overrides: tuple[_Values, list[StyleRef]],
    fallbacks: PromptOverrides,
    image: ImageRef | None,
    image_expected: bool,
    control_source: str | None = None,
    control_expected: bool = False,
) -> list[Recipe]:
    prompt, flags = _split(text)
    if not prompt:  # before the flags' values: "--ar 3:2 a cat" is a prompt put last
        raise PromptError(
            "Write what to imagine before the flags, for example: a lighthouse at dusk --ar 3:2.",
            flag="prompt",
            value="",
            allowed="a description of the picture",
        )
    values: _Values = {}
    styles: list[StyleRef] = []
    for raw_name, value in flags:
        name = _ALIASES.get(raw_name, raw_name)
        if name not in FLAGS:
            raise _unknown_flag(raw_name)
        if name == "style":
            _add_style(styles, _style(value, defaults, known_styles), value)
            continue
        if name in values:
            raise PromptError(
                f"--{raw_name} is given twice; keep one.",
                flag=f"--{raw_name}",
                value=value,
                allowed="each flag once",
            )
        if name == "ar":
            values[name] = _ratio(value)
        elif name == "seed":
            values[name] = _whole("seed", value, 0, MAX_SEED)
        elif name == "no":
            values[name] = _negative(value)
        elif name == "steps":
            values[name] = _whole("steps", value, 1, 150)
        elif name == "cfg":
            values[name] = _number(raw_name, value, 0.0, 30.0)
        elif name == "sampler":
            values[name] = _sampler(value)
        elif name == "repeat":
            values[name] = _whole("repeat", value, 1, MAX_GENERATIONS)
        elif name == "control":
            values[name] = _control_types(value)
        elif name in _CONTROL_TUNING:
            low, high, _default = _CONTROL_TUNING[name]
            values[name] = [_number(name, part.strip(), low, high) for part in value.split(",")]
        elif name == "iw":
            values[name] = _number("iw", value, 0.0, MAX_IMAGE_WEIGHT)
            if image is None and not image_expected:
                raise PromptError(
                    "--iw weighs an image prompt, and there is none; attach an image or "
                    "start the prompt with a Discord image link.",
                    flag="--iw",
                    value=value,
                    allowed="an image prompt to weigh",
                )
    override_values, override_styles = overrides
    values.update(override_values)
    for ref in override_styles:
        named = [style.name for style in styles]
        if ref.name in named:
            styles[named.index(ref.name)] = ref
        else:
            styles.append(ref)
    _refuse_unhonoured(values, defaults.family)
    # Only the defaults that apply are checked: a stale one the text replaces refuses nothing.
    # A member's default the family cannot honour (their --cfg on FLUX schnell) is left out,
    # and so is a default style unknown here (set in another server, or removed since).
    given = set(values) | ({"style"} if styles else set()) | set(defaults.family.refused_flags)
    if known_styles is not None and unknown_default_style(fallbacks, known_styles) is not None:
        given.add("style")
    # An image prompt gives the picture its shape unless this prompt gives --ar: a default
    # ratio would crop the image. (One that only gives a control's structure does not.)
    attached = control_source is not None or control_expected
    structure_only = bool(values.get("control")) and not attached and "iw" not in values
    if (image is not None or image_expected) and not structure_only:
        given.add("ar")
    try:
        fallback_values, fallback_styles = _typed(
            fallbacks, defaults, known_styles, _TYPED_FLAGS - given
        )
    except PromptError as error:  # the member never typed it here: say where it comes from
        raise PromptError(
            f"Your /settings default does not apply here: {error} Change it with /settings "
            "set, or give the flag in the prompt.",
            flag=error.flag,
            value=error.value,
            allowed=error.allowed,
        ) from None
    values = {**fallback_values, **values}
    if not styles:
        styles = list(fallback_styles)
    if len(prompt) > MAX_PROMPT_LENGTH:
        raise PromptError(
            f"The prompt is {len(prompt)} characters long; shorten it to at most "
            f"{MAX_PROMPT_LENGTH}.",
            flag="prompt",
            value=_shown(prompt),
            allowed=f"at most {MAX_PROMPT_LENGTH} characters",
        )
    _check_t5_length(prompt, defaults.family)
    if values.get("control") and control_source is None and image is not None:
        control_source = image.blob_key  # the one image gives the structure ...
        if "iw" not in values:
            image = None  # ... and is an image prompt too only when --iw says so
    controls = _controls(values, control_source, control_expected or image_expected, attached)
    ratio = values.get("ar")
    assert ratio is None or isinstance(ratio, tuple)
    width, height = size_for(ratio, defaults.family)
    repeat = int(values.get("repeat", 1))  # type: ignore[call-overload]
    seed = values.get("seed")
    first = int(seed) if seed is not None else None  # type: ignore[call-overload]
    weight = values.get("iw")
    assert weight is None or isinstance(weight, float)
    recipes = []
    for run in range(repeat):
        this_seed = draw() if first is None else repeat_seed(first, run, defaults.count)
        recipe = Recipe(
            model=defaults.model,
            model_family=defaults.family.name,
            prompt=prompt,
            negative_prompt=str(values.get("no", "")),
            seed=this_seed,
            width=width,
            height=height,
            aspect_ratio=f"{ratio[0]}:{ratio[1]}" if ratio else None,
            steps=int(values.get("steps", defaults.family.default_steps)),  # type: ignore[call-overload]
            guidance=float(values.get("cfg", defaults.family.default_guidance)),  # type: ignore[arg-type]
            sampler=str(values.get("sampler", defaults.sampler)),
            count=defaults.count,
            styles=tuple(styles),
            controls=controls,
        )
        if image is not None:
            recipe = with_image_prompt(recipe, image, weight, defaults.family)
        recipes.append(recipe)
    return recipes


def parse_prompt(
    text: str,
    defaults: PromptDefaults,
    *,
    random_seed: Callable[[], int] | None = None,
    known_styles: Collection[str] | None = None,
    overrides: PromptOverrides | None = None,
    fallbacks: PromptOverrides | None = None,
    image: ImageRef | None = None,
    image_expected: bool = False,
    control_source: str | None = None,
    control_expected: bool = False,
) -> list[Recipe]:
    """One recipe per generation the text asks for; :class:`PromptError` if it is invalid.

    ``overrides`` (a command's typed options) replace the same flags in the text;
    ``fallbacks`` (a member's defaults) apply where neither gives a value. ``image`` is
    the image prompt (stored already); ``image_expected`` checks the text of one still
    to be fetched (``--iw`` is allowed; the recipes carry no image). ``control_source`` is
    the blob key of the image ``--control`` takes its structure from (the ``control``
    attachment), or ``control_expected`` while it is still to be fetched.
    """
    draw = random_seed or fresh_seed
    typed = _typed(overrides or PromptOverrides(), defaults, known_styles)
    recipes: list[Recipe] = []
    text = _dashes(text)
    if text.count("{") > MAX_GROUPS:
        raise PromptError(
            f"The prompt has {text.count('{')} {{}} groups; use at most {MAX_GROUPS}.",
            flag="{}",
            value=str(text.count("{")),
            allowed=f"at most {MAX_GROUPS} groups",
        )
    for variant in _expand(text):
        recipes.extend(
            _parse_one(
                variant,
                defaults,
                draw,
                known_styles,
                typed,
                fallbacks or PromptOverrides(),
                image,
                image_expected,
                control_source,
                control_expected,
            )
        )
        if len(recipes) > MAX_GENERATIONS:
            raise _too_many(len(recipes))
    return recipes


def format_recipe(recipe: Recipe) -> str:
    """The recipe as prompt text; parsing it gives the same recipe back.

    Flags the recipe's family refuses (``--cfg`` on FLUX schnell) are left out: their
    values are the family's defaults, which parsing gives back.
    """
    family = recipe.family
    refused = family.refused_flags if family is not None else {}
    parts = [recipe.prompt]
    if recipe.aspect_ratio:
        parts.append(f"--ar {recipe.aspect_ratio}")
    parts.append(f"--seed {recipe.seed}")
    if recipe.negative_prompt:
        parts.append(f"--no {recipe.negative_prompt}")
    parts.append(f"--steps {recipe.steps}")
    if "cfg" not in refused:
        parts.append(f"--cfg {recipe.guidance!r}")
    if recipe.sampler != DEFAULT_SAMPLER:
        parts.append(f"--sampler {recipe.sampler}")
    parts.extend(f"--style {style.name}:{style.weight!r}" for style in recipe.styles)
    if recipe.init_image is not None and recipe.image_weight is not None:
        parts.append(f"--iw {recipe.image_weight!r}")  # the image itself stays with the recipe
    if recipe.controls:  # their image too
        controls = recipe.controls
        parts.append("--control " + ",".join(c.type + (":raw" if c.raw else "") for c in controls))
        for name, field_name in (("cw", "weight"), ("cstart", "start"), ("cend", "end")):
            numbers = [getattr(c, field_name) for c in controls]
            if any(n != _CONTROL_TUNING[name][2] for n in numbers):
                parts.append(f"--{name} " + ",".join(f"{n!r}" for n in numbers))
    return " ".join(parts)
