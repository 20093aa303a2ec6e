"""The prompt language: flags, permutations, errors that say what to change, round trips."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.prompt import (
    MAX_GENERATIONS,
    SAMPLERS,
    PromptDefaults,
    PromptError,
    PromptOverrides,
    format_recipe,
    parse_prompt,
    size_for,
    unknown_default_style,
)
from storage.derive import image_prompt_size
from storage.families import ASPECT_RATIOS, FAMILIES
from storage.recipe import ImageRef, StyleRef, repeat_seed

SD15 = PromptDefaults(model="sd", family=FAMILIES["sd15"], style_weights={"watercolor": 0.8})
STYLES = ["watercolor", "inkwash", "pixel-art"]


def fixed_seeds() -> itertools.count[int]:
    return itertools.count(1000)


def parse(text: str, defaults: PromptDefaults = SD15, **kwargs: object) -> list:
    seeds = fixed_seeds()
    return parse_prompt(text, defaults, random_seed=lambda: next(seeds), **kwargs)  # type: ignore[arg-type]


def test_a_plain_prompt_gets_the_family_defaults_and_a_random_seed() -> None:
    (recipe,) = parse("  a   lighthouse\nat dusk ")
    assert recipe.prompt == "a lighthouse at dusk"
    assert (recipe.width, recipe.height) == (512, 512)
    assert recipe.aspect_ratio is None
    assert recipe.seed == 1000
    assert recipe.steps == 30 and recipe.guidance == 7.0
    assert recipe.count == 4 and recipe.model == "sd" and recipe.model_family == "sd15"


def test_every_flag() -> None:
    (recipe,) = parse(
        "a cat --ar 3:2 --seed 7 --no people,  text ,, --steps 20 --cfg 4.5 "
        "--sampler Euler_A --style watercolor --style inkwash:-0.5",
        known_styles=STYLES,
    )
    assert recipe.prompt == "a cat"
    assert recipe.aspect_ratio == "3:2" and recipe.width > recipe.height
    assert recipe.seed == 7
    assert recipe.negative_prompt == "people, text"
    assert recipe.steps == 20 and recipe.guidance == 4.5
    assert recipe.sampler == "euler_a"
    assert recipe.styles == (
        StyleRef(name="watercolor", weight=0.8),
        StyleRef(name="inkwash", weight=-0.5),
    )


def test_guidance_alias_equals_form_em_dash_and_case() -> None:
    (a,) = parse("a cat --guidance 3 —SEED=5 --AR 16:9")
    assert a.guidance == 3.0 and a.seed == 5 and a.aspect_ratio == "16:9"


def test_ratios_are_reduced_and_sized_to_the_pixel_budget() -> None:
    (recipe,) = parse("x --ar 6:4")
    assert recipe.aspect_ratio == "3:2"
    assert (recipe.width, recipe.height) == (624, 416)
    (xl,) = parse("x --ar 1:1", PromptDefaults(model="xl", family=FAMILIES["sdxl"]))
    assert (xl.width, xl.height) == (1024, 1024)


def test_dashes_inside_words_are_text() -> None:
    (recipe,) = parse("a state-of-the-art--robot --seed 1")
    assert recipe.prompt == "a state-of-the-art--robot"


def test_an_em_dash_that_starts_no_word_is_punctuation() -> None:
    (recipe,) = parse("a lighthouse — at dusk, pre—war —ar 3:2 —seed 4")
    assert recipe.prompt == "a lighthouse — at dusk, pre—war"
    assert (recipe.aspect_ratio, recipe.seed) == ("3:2", 4)
    assert parse(format_recipe(recipe)) == [recipe]


def test_flags_before_the_prompt_are_told_to_go_after_it() -> None:
    for text in ("--ar 3:2 a cat", "—seed 5 a cat", "--no people"):
        with pytest.raises(PromptError, match="Write what to imagine before the flags"):
            parse(text)


def test_a_flag_glued_to_a_negative_is_refused_not_swallowed() -> None:
    for text in ("a cat --no dogs,--seed 5", "a cat --no dogs,—ar 2:1"):
        with pytest.raises(PromptError, match="needs a space before its --") as refused:
            parse(text)
        assert refused.value.flag == "--no"


def test_permutations_expand_into_several_generations() -> None:
    recipes = parse("a {red, blue} {car, bike} --seed 3")
    assert [r.prompt for r in recipes] == ["a red car", "a red bike", "a blue car", "a blue bike"]
    assert {r.seed for r in recipes} == {3}
    nested = parse("a {big {red, green}, small} dog --seed 1")
    assert [r.prompt for r in nested] == ["a big red dog", "a big green dog", "a small dog"]
    in_flags = parse("a dog --ar {1:1, 2:1} --seed 1")
    assert [r.aspect_ratio for r in in_flags] == ["1:1", "2:1"]


def test_repeat_gives_new_seeds() -> None:
    explicit = parse("a dog --seed 10 --repeat 3")
    assert [r.seed for r in explicit] == [10, 14, 18]
    random = parse("a dog --repeat 3")
    assert [r.seed for r in random] == [1000, 1001, 1002]


def test_too_many_generations_are_refused() -> None:
    with pytest.raises(PromptError, match=f"at most {MAX_GENERATIONS} generations"):
        parse("a {1,2,3,4} {4,5,6} dog")
    with pytest.raises(PromptError, match="at most 10"):
        parse("a {cat, dog} --repeat 6")


@pytest.mark.parametrize(
    ("text", "flag", "value", "allowed"),
    [
        ("a --ar 0:1", "--ar", "0:1", "W:H"),
        ("a --ar 5:1", "--ar", "5:1", "between 1:4 and 4:1"),
        ("a --ar wide", "--ar", "wide", "for example --ar 3:2"),
        ("a --seed -1", "--seed", "-1", "from 0 to 4294967295"),
        ("a --seed 4294967296", "--seed", "4294967296", "from 0 to 4294967295"),
        ("a --steps 0", "--steps", "0", "from 1 to 150"),
        ("a --cfg nan", "--cfg", "nan", "from 0 to 30"),
        ("a --cfg 31", "--cfg", "31", "from 0 to 30"),
        ("a --sampler warp", "--sampler", "warp", "euler_a"),
        ("a --style bad name", "--style", "bad name", "style name"),
        ("a --style ok:9", "--style", "ok:9", "from -2 to 2"),
        ("a --repeat 11", "--repeat", "11", "from 1 to 10"),
        ("a --no ,", "--no", ",", "what to leave out"),
    ],
)
def test_errors_name_the_flag_the_value_and_what_is_allowed(
    text: str, flag: str, value: str, allowed: str
) -> None:
    with pytest.raises(PromptError) as refused:
        parse(text)
    error = refused.value
    assert (error.flag, error.value) == (flag, value)
    assert allowed in error.allowed
    message = str(error)
    assert flag in message and value in message and allowed in message


def test_missing_values_unknown_flags_and_repeats() -> None:
    with pytest.raises(PromptError, match="--seed needs a value: a whole number"):
        parse("a cat --seed")
    with pytest.raises(PromptError, match=r"--chaos is not a flag.*--ar, --seed"):
        parse("a cat --chaos 50")
    with pytest.raises(PromptError, match="Did you mean --seed"):
        parse("a cat --seeds 5")
    with pytest.raises(PromptError, match="--seed is given twice"):
        parse("a cat --seed 1 --seed 2")
    with pytest.raises(PromptError, match="watercolor is given twice"):
        parse("a cat --style watercolor --style watercolor:0.5")
    with pytest.raises(PromptError, match="Write what to imagine"):
        parse("   --ar 3:2")
    with pytest.raises(PromptError, match="has no partner"):
        parse("a {cat")
    with pytest.raises(PromptError, match="has no partner"):
        parse("a cat}")
    with pytest.raises(PromptError, match="at most 20"):
        parse("a" + "{b}" * 500)


def test_unknown_style_suggests_the_closest() -> None:
    with pytest.raises(PromptError, match="did you mean watercolor"):
        parse("a cat --style watercolour", known_styles=STYLES)
    (anything,) = parse("a cat --style anything")  # no registry given: not checked here
    assert anything.styles[0].name == "anything"


# SD3 and FLUX patch 2x2 latents of a VAE that scales by 8; the tiny builds keep their rule.
SIXTEEN = {"sd3", "sd3-turbo", "flux", "flux-schnell", "tiny-sd3", "tiny-flux"}


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl", "sd3", "flux", "tiny-sd", "tiny-flux"])
def test_sizes_fit_the_size_step_near_the_budget_for_every_ratio(name: str) -> None:
    family = FAMILIES[name]
    step, budget = 16 if name in SIXTEEN else 8, family.pixel_budget
    for width in range(1, 101):
        for height in range(max(1, (width + 3) // 4), min(100, width * 4) + 1):
            w, h = size_for((width, height), family)
            assert w % step == 0 and h % step == 0
            assert abs(w * h - budget) / budget < 0.1 or name.startswith("tiny")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_ar_choice_and_photo_shape_gets_a_size_the_family_can_make(name: str) -> None:
    family, step = FAMILIES[name], 16 if name in SIXTEEN else 8
    defaults = PromptDefaults(model="m", family=family)
    for ratio in ASPECT_RATIOS:
        [recipe] = parse(f"a harbour --ar {ratio[0]}:{ratio[1]}", defaults)
        assert (recipe.width % step, recipe.height % step) == (0, 0), recipe.aspect_ratio
    for width, height in ((4032, 3024), (1920, 1080)):  # a phone photo (4:3), a screenshot
        ref = ImageRef(blob_key="a" * 64, sha256="a" * 64, width=width, height=height)
        [recipe] = parse("a harbour", defaults, image=ref)
        assert (recipe.width, recipe.height) == image_prompt_size(ref, family)
        assert (recipe.width % step, recipe.height % step) == (0, 0), (width, height)
    assert family.size_step == step  # what the engine checks a size against


flag_values = {
    "ar": st.sampled_from(["1:1", "3:2", "2:3", "16:9", "4:1", "7:5", "0:1", "x"]),
    "seed": st.integers(min_value=-5, max_value=2**32 + 5).map(str),
    "no": st.text(max_size=20),
    "steps": st.integers(min_value=-1, max_value=160).map(str),
    "cfg": st.floats(allow_nan=True, allow_infinity=True).map(repr),
    "guidance": st.floats(min_value=0, max_value=30).map(repr),
    "sampler": st.sampled_from([*SAMPLERS, "nope"]),
    "style": st.sampled_from(["watercolor", "inkwash:0.5", "pixel-art:-2.0", "x:3", "bad name"]),
    "repeat": st.integers(min_value=0, max_value=4).map(str),
    "chaos": st.just("5"),
}
realistic = st.builds(
    lambda prompt, flags, dash: prompt + "".join(f" {dash}{name} {value}" for name, value in flags),
    st.text(min_size=0, max_size=40),
    st.lists(
        st.sampled_from(sorted(flag_values)).flatmap(
            lambda name: st.tuples(st.just(name), flag_values[name])
        ),
        max_size=5,
    ),
    st.sampled_from(["--", "—"]),
)
texts = st.one_of(st.text(max_size=80), realistic)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_any_text_parses_or_raises_only_prompt_error(text: str) -> None:
    try:
        recipes = parse(text)
    except PromptError as error:
        assert str(error).endswith((".", "?"))
        return
    assert 1 <= len(recipes) <= MAX_GENERATIONS
    for recipe in recipes:
        assert recipe.prompt and recipe.prompt == recipe.prompt.strip()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_formatting_a_parsed_recipe_parses_back_to_the_same_recipe(text: str) -> None:
    try:
        recipes = parse(text)
    except PromptError:
        return
    for recipe in recipes:
        assert parse(format_recipe(recipe)) == [recipe]


# -- typed options: a command's own fields reach the recipe without passing through text ------


def test_typed_options_give_the_recipe_their_flags_give() -> None:
    typed = PromptOverrides(
        aspect_ratio="6:4",
        seed=7,
        negative="people,  text ,,",
        steps=20,
        cfg=4.5,
        sampler="Euler_A",
        styles=("watercolor", "inkwash:-0.5"),
    )
    flags = (
        "a cat --ar 6:4 --seed 7 --no people,  text ,, --steps 20 --cfg 4.5 --sampler Euler_A "
        "--style watercolor --style inkwash:-0.5"
    )
    assert parse("a cat", overrides=typed, known_styles=STYLES) == parse(flags, known_styles=STYLES)


def test_an_option_wins_over_the_same_flag_in_the_text() -> None:
    (recipe,) = parse(
        "a cat --seed 1 --ar 1:1 --no boats --style watercolor:0.3 --style inkwash --steps 9",
        overrides=PromptOverrides(
            seed=7, aspect_ratio="16:9", negative="people", styles=("watercolor:1.5", "pixel-art")
        ),
    )
    assert (recipe.seed, recipe.aspect_ratio, recipe.negative_prompt) == (7, "16:9", "people")
    assert recipe.steps == 9  # no option for it: the text's flag stands
    assert recipe.styles == (  # styles add up; one named twice keeps the option's weight
        StyleRef(name="watercolor", weight=1.5),
        StyleRef(name="inkwash", weight=1.0),
        StyleRef(name="pixel-art", weight=1.0),
    )


def test_a_typed_seed_applies_to_every_permutation_and_repeat() -> None:
    recipes = parse("a {red, blue} dog --repeat 2", overrides=PromptOverrides(seed=2**32 - 3))
    assert [r.seed for r in recipes] == [
        repeat_seed(2**32 - 3, run, 4) for _ in range(2) for run in range(2)
    ]
    assert [r.seed for r in recipes] == [2**32 - 3, 1, 2**32 - 3, 1]


@pytest.mark.parametrize(
    ("typed", "text"),
    [
        (PromptOverrides(seed=-1), "a --seed -1"),
        (PromptOverrides(seed=2**32), "a --seed 4294967296"),
        (PromptOverrides(aspect_ratio="5:1"), "a --ar 5:1"),
        (PromptOverrides(aspect_ratio="wide"), "a --ar wide"),
        (PromptOverrides(steps=0), "a --steps 0"),
        (PromptOverrides(cfg=31.0), "a --cfg 31.0"),
        (PromptOverrides(cfg=float("nan")), "a --cfg nan"),
        (PromptOverrides(sampler="warp"), "a --sampler warp"),
        (PromptOverrides(styles=("bad name",)), "a --style bad name"),
        (PromptOverrides(styles=("ok:9",)), "a --style ok:9"),
        (PromptOverrides(negative=","), "a --no ,"),
        (PromptOverrides(styles=("ok", "ok:0.5")), "a --style ok --style ok:0.5"),
    ],
)
def test_typed_values_are_refused_with_the_sentences_of_their_flags(
    typed: PromptOverrides, text: str
) -> None:
    with pytest.raises(PromptError) as by_option:
        parse("a", overrides=typed)
    with pytest.raises(PromptError) as by_text:
        parse(text)
    assert str(by_option.value) == str(by_text.value)
    assert (by_option.value.flag, by_option.value.value) == (
        by_text.value.flag,
        by_text.value.value,
    )


def test_typed_unknown_style_is_refused_like_the_flag() -> None:
    with pytest.raises(PromptError, match="did you mean watercolor"):
        parse("a cat", overrides=PromptOverrides(styles=("watercolour",)), known_styles=STYLES)


def test_a_typed_negative_is_never_read_as_flags() -> None:
    for negative in ("people --seed 3", "people —ar 2:1", "{people, boats}"):
        with pytest.raises(PromptError, match=r"without --flags or \{\} braces") as refused:
            parse("a cat", overrides=PromptOverrides(negative=negative))
        assert refused.value.flag == "--no"
    (recipe,) = parse("a cat", overrides=PromptOverrides(negative="state-of-the-art—robots"))
    assert recipe.negative_prompt == "state-of-the-art—robots"
    assert parse(format_recipe(recipe)) == [recipe]
    (blank,) = parse("a cat", overrides=PromptOverrides(negative="   "))
    assert blank.negative_prompt == ""


def test_user_defaults_fill_in_what_neither_the_text_nor_the_options_give() -> None:
    defaults = PromptOverrides.from_user_defaults(
        {"aspect_ratio": "3:2", "steps": 2, "guidance": 4.0, "style": "inkwash", "private": True}
    )
    assert defaults == PromptOverrides(aspect_ratio="3:2", steps=2, cfg=4.0, styles=("inkwash",))
    (plain,) = parse("a boat", fallbacks=defaults)
    assert (plain.aspect_ratio, plain.steps, plain.guidance) == ("3:2", 2, 4.0)
    assert [s.name for s in plain.styles] == ["inkwash"]
    (given,) = parse(
        "a boat --aspect 1:1 --guidance 6 --style watercolor",
        fallbacks=defaults,
        overrides=PromptOverrides(steps=5),
    )
    assert (given.aspect_ratio, given.steps, given.guidance) == ("1:1", 5, 6.0)
    assert [s.name for s in given.styles] == ["watercolor"]
    (by_option,) = parse(
        "a boat", fallbacks=defaults, overrides=PromptOverrides(styles=("pixel-art",))
    )
    assert [s.name for s in by_option.styles] == ["pixel-art"]
    assert parse("a boat", fallbacks=PromptOverrides.from_user_defaults({})) == parse("a boat")


def test_a_stale_user_default_refuses_only_where_it_applies() -> None:
    stale = PromptOverrides(styles=("deleted-style",), aspect_ratio="9:1")
    (given,) = parse(
        "a boat --style inkwash", fallbacks=stale, overrides=PromptOverrides(aspect_ratio="1:1")
    )
    assert [s.name for s in given.styles] == ["inkwash"] and given.aspect_ratio == "1:1"
    default = r"^Your /settings default does not apply here: "
    with pytest.raises(PromptError, match=default + "--ar 9:1 is not allowed") as refused:
        parse("a boat --style inkwash", fallbacks=stale, known_styles=STYLES)
    assert str(refused.value).endswith("/settings set, or give the flag in the prompt.")
    assert refused.value.flag == "--ar"


def test_a_default_style_unknown_here_is_left_out() -> None:
    """Defaults are a member's, styles a server's: a default style from another server, or
    one removed since, is left out and the prompt runs; the other defaults still apply."""
    elsewhere = PromptOverrides(styles=("deleted-style",), steps=12)
    assert unknown_default_style(elsewhere, STYLES) == "deleted-style"
    (plain,) = parse("a boat --ar 1:1", fallbacks=elsewhere, known_styles=STYLES)
    assert plain.styles == () and plain.steps == 12
    (own,) = parse("a boat --style inkwash", fallbacks=elsewhere, known_styles=STYLES)
    assert [s.name for s in own.styles] == ["inkwash"]
    here = PromptOverrides(styles=("watercolor",))
    assert unknown_default_style(here, STYLES) is None
    (styled,) = parse("a boat", fallbacks=here, known_styles=STYLES)
    assert styled.styles == (StyleRef(name="watercolor", weight=0.8),)


typed_overrides = st.builds(
    PromptOverrides,
    aspect_ratio=st.none() | st.sampled_from(["1:1", " 3:2 ", "6:4", "16:9", "5:1", "0:1", "x"]),
    seed=st.none() | st.integers(min_value=-5, max_value=2**32 + 5),
    negative=st.none() | st.text(max_size=20),
    steps=st.none() | st.integers(min_value=-1, max_value=160),
    cfg=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    sampler=st.none() | st.sampled_from([*SAMPLERS, "EULER", "nope"]),
    styles=st.lists(
        st.sampled_from(["watercolor", "inkwash:0.5", "pixel-art:-2.0", "x:3", "bad name"]),
        max_size=3,
    ).map(tuple),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, typed_overrides, typed_overrides)
def test_any_text_with_any_options_parses_to_the_options_or_raises_a_sentence(
    text: str, typed: PromptOverrides, fallbacks: PromptOverrides
) -> None:
    try:
        recipes = parse(text, overrides=typed, fallbacks=fallbacks)
    except PromptError as error:
        assert str(error).endswith((".", "?"))
        return
    assert 1 <= len(recipes) <= MAX_GENERATIONS
    if typed.seed is not None:
        assert recipes[0].seed == typed.seed
    for recipe in recipes:
        if typed.steps is not None:
            assert recipe.steps == typed.steps
        if typed.cfg is not None:
            assert recipe.guidance == typed.cfg
        if typed.sampler is not None:
            assert recipe.sampler == typed.sampler.lower()
        if typed.aspect_ratio is not None:
            (alone,) = parse(f"a --ar {typed.aspect_ratio}")
            assert recipe.aspect_ratio == alone.aspect_ratio
        assert {s.name for s in recipe.styles} >= {s.partition(":")[0] for s in typed.styles}
        assert parse(format_recipe(recipe)) == [recipe]
