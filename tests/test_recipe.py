"""The Recipe schema round-trips through JSON (and the database column) losslessly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from storage.database import Database
from storage.derive import remix_base, reroll_recipe
from storage.generations import create_generation, get_generation
from storage.models import GenerationKind
from storage.recipe import (
    MAX_SEED,
    Recipe,
    StyleRef,
    offset_seed,
    random_seed,
    repeat_seed,
)

sizes = st.integers(min_value=8, max_value=512).map(lambda n: n * 8)
finite = {"allow_nan": False, "allow_infinity": False}
recipes = st.builds(
    Recipe,
    model=st.text(min_size=1, max_size=40),
    model_hash=st.none() | st.text(max_size=20),
    model_family=st.none() | st.sampled_from(["sd15", "sdxl"]),
    prompt=st.text(max_size=200),
    negative_prompt=st.text(max_size=100),
    seed=st.integers(min_value=0, max_value=MAX_SEED),
    width=sizes,
    height=sizes,
    aspect_ratio=st.none() | st.just("3:2"),
    steps=st.integers(min_value=1, max_value=200),
    guidance=st.floats(min_value=0, max_value=50, **finite),
    sampler=st.text(min_size=1, max_size=20),
    count=st.integers(min_value=1, max_value=16),
    styles=st.lists(
        st.builds(
            StyleRef,
            name=st.text(min_size=1, max_size=64),
            weight=st.floats(min_value=-4, max_value=4, **finite),
            sha256=st.none() | st.text(max_size=64),
        ),
        max_size=3,
    ).map(tuple),
    strength=st.none() | st.floats(min_value=0.001, max_value=1, **finite),
    source_image_id=st.none() | st.integers(min_value=1, max_value=2**62),
    scale=st.none() | st.integers(min_value=2, max_value=4),
    versions=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(recipes)
def test_recipe_round_trips_through_json(recipe: Recipe) -> None:
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_seed_for_wraps_at_the_top_of_the_range() -> None:
    recipe = Recipe(model="m", prompt="p", seed=MAX_SEED, width=64, height=64, steps=1, guidance=1)
    assert [recipe.seed_for(i) for i in range(3)] == [MAX_SEED, 0, 1]


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("seed", MAX_SEED + 1), ("width", 100), ("steps", 0), ("strength", 0.0)],
)
def test_out_of_range_values_are_refused(field: str, value: object) -> None:
    values = {"model": "m", "prompt": "p", "seed": 1, "width": 64, "height": 64, "steps": 1}
    values["guidance"] = 1.0
    values[field] = value
    with pytest.raises(ValidationError, match=field):
        Recipe.model_validate(values)


# SD 3.5's 3:2 size before sizes fit the family's step: diffusers refused it at the run.
OFF_STEP = {
    "model": "stabilityai/stable-diffusion-3.5-large",
    "model_family": "sd3",
    "prompt": "a harbour",
    "seed": 1,
    "width": 1256,
    "height": 840,
    "steps": 28,
    "guidance": 4.5,
}


def test_a_size_off_the_family_step_is_refused_but_one_made_so_still_reads_back() -> None:
    sentence = r"SD 3\.5 makes images whose sides are multiples of 16 pixels, and 1256×840 is not"
    with pytest.raises(ValidationError, match=sentence):
        Recipe.model_validate(OFF_STEP)
    assert Recipe.model_validate(OFF_STEP | {"model_family": "sdxl"}).width == 1256
    assert Recipe.model_validate(OFF_STEP | {"model_family": None}).width == 1256
    old = Recipe.as_made(OFF_STEP)  # stored before the check; the engine refuses to run it
    assert Recipe.from_json(old.to_json()) == old  # its PNG's recipe too
    # A reroll or remix of such a row (FLUX made it, rounding its sides down) is made at
    # the sides the family makes, as the image was.
    for flux in (old, Recipe.as_made(OFF_STEP | {"model_family": "flux"})):
        for derived in (reroll_recipe(flux), remix_base(flux)):
            assert (derived.width, derived.height) == (1248, 832)


async def test_a_stored_recipe_off_its_family_step_still_loads(database: Database) -> None:
    old = Recipe.as_made(OFF_STEP)
    async with database.session() as session:
        made = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=old, requester_id=1
        )
    async with database.session() as session:
        assert (await get_generation(session, made.id)).recipe == old


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        Recipe.model_validate_json(
            '{"model":"m","prompt":"p","seed":1,"width":64,"height":64,"steps":1,'
            '"guidance":1,"colour":"red"}'
        )


def test_seed_arithmetic_wraps_and_never_repeats_a_seed_across_runs() -> None:
    assert offset_seed(MAX_SEED - 1, 3) == 1
    top = MAX_SEED - 5
    runs = [[offset_seed(repeat_seed(top, run, 4), i) for i in range(4)] for run in range(3)]
    assert runs[0] == [top, top + 1, top + 2, top + 3]
    assert runs[1] == [top + 4, top + 5, 0, 1]
    seeds = [seed for run in runs for seed in run]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= random_seed() <= MAX_SEED for _ in range(100))
    assert len({random_seed() for _ in range(100)}) > 90


def test_rerolls_and_variations_draw_their_seeds_from_the_one_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import storage.derive as derive

    monkeypatch.setattr(derive, "random_seed", lambda: 1234)
    parent = Recipe(model="m", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1.0)
    assert derive.reroll_recipe(parent).seed == 1234
    assert derive.reroll_recipe(parent, seed=5).seed == 5


def test_no_module_draws_or_computes_seeds_outside_storage_recipe() -> None:
    """Seed arithmetic lives in storage/recipe.py: a second copy would drift."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # Randomness that is not a seed: the jitter that spreads retries after a Discord outage.
    not_seeds = {
        "bot/retries.py": "random.uniform(backoff / 2, backoff)",
    }
    pattern = re.compile(
        r"\bsecrets\b|\brandom\.|randbelow|randint|getrandbits|seed \+|seed\s*%|MAX_SEED \+ 1"
    )
    found = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for folder in ("bot", "generation", "storage")
        for path in sorted((root / folder).rglob("*.py"))
        if path.relative_to(root).as_posix() != "storage/recipe.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
        and not_seeds.get(path.relative_to(root).as_posix(), "\0") not in line
    ]
    assert found == []
