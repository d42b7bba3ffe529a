"""Structured output from JSON Schema and pydantic models (issue 20): the supported subset,
the refusals, and every reply validating, on a random tiny model with the real tokenizer."""

import enum
from typing import List, Literal, Optional, Union

import pytest
from pydantic import BaseModel, Field

from mlx_diffgemma import SchemaError, generate_json, json_frame


class Flat(BaseModel):
    city: str
    year: int
    big: bool


class WithLiteral(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confidence: float = Field(ge=0, le=1)


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class WithEnum(BaseModel):
    color: Color
    count: int = Field(gt=0, lt=10)


class WithOptional(BaseModel):
    name: str = Field(max_length=12)
    age: Optional[int]


class Address(BaseModel):
    street: str
    zip: str = Field(min_length=2)


class Nested(BaseModel):
    name: str
    address: Address


class Tags(BaseModel):
    tags: List[str] = Field(max_length=3)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    name: str


class Owner(BaseModel):
    pets: List[Pet] = Field(min_length=1, max_length=2)
    best: Optional[Pet]


class Cat(BaseModel):
    meow: bool


class Dog(BaseModel):
    bark: int


class Either(BaseModel):
    animal: Union[Cat, Dog]


MODELS = [Flat, WithLiteral, WithEnum, WithOptional, Nested, Tags, Owner, Either]


@pytest.mark.slow
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_every_reading_validates(tiny, cls):
    model, tok = tiny
    for seed in range(3):
        value = generate_json(model, tok, cls, seed=seed, max_denoising_steps=2)
        assert isinstance(value, cls)
        # The JSON the server sends parses back into the model.
        assert cls.model_validate_json(value.model_dump_json()) == value


@pytest.mark.slow
def test_schema_dicts_give_plain_values(tiny):
    model, tok = tiny
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 5, "maximum": 7},
            "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "k": {"const": "fixed"},
            "e": {"enum": [1, "two", None, True]},
            "s": {"type": "string", "minLength": 2, "maxLength": 4},
            "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "x-max-items": 2},
            "t": {"type": ["string", "null"]},
        },
        "required": ["n"],
        "additionalProperties": False,
    }
    for seed in range(4):
        v = generate_json(model, tok, schema, seed=seed, max_denoising_steps=2)
        assert 5 <= v["n"] <= 7 and 0 < v["x"] < 1 and v["k"] == "fixed"
        assert v["e"] in (1, "two", None, True) and 2 <= len(v["s"]) <= 4
        assert 1 <= len(v["a"]) <= 2 and all(isinstance(i, int) for i in v["a"])
        assert v["t"] is None or isinstance(v["t"], str)


def test_choices_are_decided_on_the_canvas(tok):
    """A finite choice is a run of one-token holes allowed only the alternatives' tokens."""
    frame = json_frame(tok, {"enum": ["red", "green"]})
    holes = frame.template.holes
    assert len(holes) == 3  # '"', the colour, '"'
    allowed = [set(h.first.nonzero()[0].tolist()) for h in holes]
    red, green = tok.encode('"red"'), tok.encode('"green"')
    assert allowed == [{red[0]}, {red[1], green[1]}, {red[2]}]


REFUSED = [
    ({"type": "string", "pattern": "a+"}, "'pattern'"),
    ({"type": "string", "format": "date"}, "'format'"),
    ({"type": "object", "patternProperties": {}}, "'patternProperties'"),
    ({"type": "number", "multipleOf": 2}, "'multipleOf'"),
    ({"type": "array", "prefixItems": [], "items": {"type": "string"}}, "'prefixItems'"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "['b']"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "'allOf'"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "array"}, "needs 'items'"),
    ({"$ref": "#/$defs/Nope", "$defs": {}}, "names no entry"),
    (
        {
            "$ref": "#/$defs/Node",
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {"next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
                }
            },
        },
        "recursive $ref is not supported: Node -> Node",
    ),
    ({"type": "object", "properties": {"a": {"type": "string", "x-max-tokens": 10**6}}}, "context"),
]


@pytest.mark.parametrize("schema,words", REFUSED)
def test_refusals_name_the_keyword_and_path(tok, schema, words):
    with pytest.raises(SchemaError) as e:
        json_frame(tok, schema, limit=512)
    assert words in str(e.value) and str(e.value).startswith("$")
