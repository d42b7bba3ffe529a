"""Tokenizer tests against the real Gemma 4 SentencePiece model (ids as transformers' Gemma 4
tokenizer gives them for the same text)."""

import json
import shutil

import jinja2
import pytest
import sentencepiece as spm
from tokenizer_fixture import gemma4_spm_path

from mlx_diffgemma.tokenizer import Tokenizer, render_gemma4_chat, split_thinking

SKY = "Why is the sky blue?"
SKY_IDS = [11355, 563, 506, 7217, 3730, 236881]
CHAT_IDS = [2, 105, 2364, 107, *SKY_IDS, 106, 107, 105, 4368, 107]
# Byte-fallback characters (CJK Ext. B, a recent emoji, Old Church Slavonic), CJK, emoji,
# combining marks and whitespace runs.
TEXTS = [
    SKY,
    "𠀀𠀁 \U0001fae8 ꙮ",
    "日本語のテキストと한국어",
    "😀 emoji 🧑\u200d💻 á",
    "def f(x):\n" + " " * 34 + "return x\t\t# done\n\n\n",
]


def make_folder(path, spm_file, files=()):
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spm_file, path / "tokenizer.model")
    for name, content in dict(files).items():
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture(scope="module")
def spm_file():
    return gemma4_spm_path()


@pytest.fixture(scope="module")
def sp(spm_file):
    return spm.SentencePieceProcessor(model_file=str(spm_file))


@pytest.fixture(scope="module")
def tok(spm_file, tmp_path_factory):
    return Tokenizer.from_pretrained(make_folder(tmp_path_factory.mktemp("spm"), spm_file))


def user(text):
    return {"role": "user", "content": text}


# Encoding and the chat template


def test_encode_has_no_bos(tok):
    assert tok.encode(SKY) == SKY_IDS


def test_special_ids(tok):
    assert (tok.vocab_size, tok.bos_token_id, tok.pad_token_id) == (262144, 2, 0)


def test_markers_typed_in_text_map_to_their_ids(tok):
    assert tok.encode("<|turn>user\n") == [105, 2364, 107]
    assert tok.encode("<|channel>thought\n<channel|>") == [100, 45518, 107, 101]
    assert tok.encode("<|think|>") == [98]


def test_chat_prompt(tok):
    messages = [user(SKY)]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        f"<bos><|turn>user\n{SKY}<turn|>\n<|turn>model\n"
    )
    assert tok.apply_chat_template(messages) == CHAT_IDS


def test_system_turn(tok):
    messages = [{"role": "system", "content": "  Be brief.\n"}, user(f" {SKY} ")]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert (
        text == f"<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n{SKY}<turn|>\n<|turn>model\n"
    )
    ids = tok.apply_chat_template(messages)
    assert ids[:4] == [2, 105, 9731, 107]
    assert ids[-len(CHAT_IDS) + 1 :] == CHAT_IDS[1:]


def test_thinking_with_system(tok):
    messages = [{"role": "system", "content": "Be brief."}, user(SKY)]
    text = tok.apply_chat_template(messages, enable_thinking=True, tokenize=False)
    assert text.startswith("<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\n")
    assert tok.apply_chat_template(messages, enable_thinking=True)[:6] == [
        2,
        105,
        9731,
        107,
        98,
        107,
    ]


def test_thinking_without_system_opens_a_system_turn(tok):
    text = tok.apply_chat_template([user(SKY)], enable_thinking=True, tokenize=False)
    assert (
        text == f"<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n{SKY}<turn|>\n<|turn>model\n"
    )
    ids = tok.apply_chat_template([user(SKY)], enable_thinking=True)
    assert ids[:8] == [2, 105, 9731, 107, 98, 107, 106, 107]
    assert ids.count(98) == 1


def test_multi_turn_history_drops_thoughts(tok):
    messages = [
        user("Capital of France?"),
        {"role": "assistant", "content": "<|channel>thought\nEasy.<channel|>Paris. "},
        user("And of Italy?"),
        {"role": "model", "content": "Rome."},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text == (
        "<bos><|turn>user\nCapital of France?<turn|>\n<|turn>model\nParis.<turn|>\n"
        "<|turn>user\nAnd of Italy?<turn|>\n<|turn>model\nRome.<turn|>\n"
    )
    ids = tok.apply_chat_template(messages[:3])
    assert 100 not in ids and ids[-3:] == [105, 4368, 107]


def test_text_parts_are_trimmed_one_by_one(tok):
    # As the Gemma 4 template (`item['text'] | trim` per part), then joined as they are.
    parts = {
        "role": "user",
        "content": [
            {"type": "text", "text": " Why is the sky "},
            {"type": "text", "text": " blue? "},
        ],
    }
    assert tok.apply_chat_template([parts]) == tok.apply_chat_template(
        [user("Why is the skyblue?")]
    )


def test_unsupported_role_and_part():
    with pytest.raises(ValueError, match="role 'tool'"):
        render_gemma4_chat([user("hi"), {"role": "tool", "content": "42"}])
    with pytest.raises(ValueError, match="'audio'"):
        render_gemma4_chat([{"role": "user", "content": [{"type": "audio"}]}])


# eos ids


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"eos_token_id": 106}, [106]),
        ({"eos_token_id": [1, 106]}, [1, 106]),
        (None, [1, 106, 50]),
    ],
)
def test_eos_token_ids(spm_file, tmp_path, config, expected):
    files = {"generation_config.json": config} if config else {}
    assert (
        Tokenizer.from_pretrained(make_folder(tmp_path, spm_file, files)).eos_token_ids == expected
    )


def test_bad_eos_token_id(spm_file, tmp_path):
    folder = make_folder(tmp_path, spm_file, {"generation_config.json": {"eos_token_id": "<eos>"}})
    with pytest.raises(ValueError, match="eos_token_id '<eos>'"):
        Tokenizer.from_pretrained(folder)


# Decoding


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok, sp, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == sp.decode(ids)


def test_decode_special_tokens(tok):
    assert tok.decode(CHAT_IDS) == f"<bos><|turn>user\n{SKY}<turn|>\n<|turn>model\n"
    assert tok.decode(CHAT_IDS, skip_special_tokens=True) == f"user\n{SKY}\nmodel\n"
    assert tok.decode([2, 1, 0, 3, 4]) == "<bos><eos><pad><unk><mask>"
    assert tok.decode([2, 1, 0, 3, 4], skip_special_tokens=True) == ""
    # User-defined pieces that are plain text stay.
    assert tok.decode(tok.encode("<table>\n\n"), skip_special_tokens=True) == "<table>\n\n"


# Streaming


def stream(tokenizer, ids, block, **kwargs):
    detok = tokenizer.detokenizer(**kwargs)
    deltas = [detok.add_tokens(ids[i : i + block]) for i in range(0, len(ids), block)]
    return deltas + [detok.finalize()]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 256])
def test_detokenizer_deltas_concatenate_to_decode(tok, block):
    ids = tok.apply_chat_template([user("".join(TEXTS))]) + tok.encode("".join(reversed(TEXTS)))
    deltas = stream(tok, ids, block)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    skipped = stream(tok, ids, block, skip_special_tokens=True)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True)


def test_detokenizer_holds_back_a_split_character(tok):
    ids = tok.encode("a𠀀")  # 'a' and four byte tokens
    assert len(ids) == 5
    detok = tok.detokenizer()
    assert detok.add_tokens(ids[:3]) == "a"
    assert detok.add_tokens(ids[3:]) == "𠀀"
    assert detok.finalize() == ""
    # A character cut short at the end comes out as decode() shows it.
    detok = tok.detokenizer()
    assert detok.add_tokens(ids[:3]) + detok.finalize() == tok.decode(ids[:3])


# split_thinking


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<|channel>thought\nLet me see.<channel|>Blue.", ("Let me see.", "Blue.")),
        ("<|channel>thought\n<channel|>Blue.", ("", "Blue.")),
        ("Blue.", (None, "Blue.")),
        ("<|channel>thought\nStill thinking", ("Still thinking", "")),
        ("<|channel>thought", ("", "")),
        ("thought\nBlue.", (None, "Blue.")),
        ("final\nBlue.", (None, "Blue.")),
        ("<|channel>Blue.", (None, "Blue.")),
        ("<|channel>final\nBlue.", (None, "Blue.")),
        ("<|channel>thought\nHm.<channel|><|channel>final\nBlue.", ("Hm.", "Blue.")),
        ("thoughtful\nBlue.", (None, "thoughtful\nBlue.")),
        ("I thought\nso.", (None, "I thought\nso.")),
    ],
)
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_split_thinking_on_decoded_ids(tok):
    ids = tok.encode("<|channel>thought\nRayleigh.<channel|>Scattering.")
    assert split_thinking(tok.decode(ids)) == ("Rayleigh.", "Scattering.")


# Loading


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer.json or tokenizer.model in") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


SHOUT = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}]"
    "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    "{% if add_generation_prompt %}[GO]{% endif %}{% if enable_thinking %}[THINK]{% endif %}"
    "{% if messages | length > 2 %}{{ raise_exception('one question at a time') }}{% endif %}"
)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_checkpoint_template_is_used(spm_file, tmp_path, where):
    files = {where: SHOUT if where.endswith(".jinja") else {"chat_template": SHOUT}}
    tokenizer = Tokenizer.from_pretrained(make_folder(tmp_path, spm_file, files))
    text = tokenizer.apply_chat_template([user("hi")], enable_thinking=True, tokenize=False)
    assert text == "<bos>[USER]hi[GO][THINK]"
    assert tokenizer.apply_chat_template([user("hi")])[:1] == [2]
    with pytest.raises(jinja2.TemplateError, match="one question at a time"):
        tokenizer.apply_chat_template([user("a"), user("b"), user("c")])


# The Gemma 4 template family's system/thinking/history logic, as a Jinja file.
GEMMA4_LIKE = """{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if enable_thinking or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\\n' -}}
    {%- if enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {%- if role == 'model' -%}
        {%- set ns = namespace(result='') -%}
        {%- for part in message['content'].split('<channel|>') -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- endfor -%}
        {{- ns.result | trim -}}
    {%- else -%}
        {{- message['content'] | trim -}}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


@pytest.mark.parametrize("thinking", [False, True])
def test_builtin_matches_gemma4_style_jinja(spm_file, tmp_path, tok, thinking):
    jinja_tok = Tokenizer.from_pretrained(
        make_folder(tmp_path, spm_file, {"chat_template.jinja": GEMMA4_LIKE})
    )
    chats = [
        [user(SKY)],
        [{"role": "system", "content": " Be brief. "}, user(SKY)],
        [
            user("a"),
            {"role": "assistant", "content": "<|channel>thought\nx<channel|> b "},
            user("c"),
        ],
    ]
    for chat in chats:
        assert tok.apply_chat_template(
            chat, enable_thinking=thinking
        ) == jinja_tok.apply_chat_template(chat, enable_thinking=thinking)


def tiny_tokenizer_json(path, with_bos=True):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    if not with_bos:
        specials.remove("<bos>")
    words = ["hello", "world", "user", "model"]
    hf = HFTokenizer(
        models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>")
    )
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    hf.save(str(path / "tokenizer.json"))


def test_tokenizer_json_is_preferred(spm_file, tmp_path):
    folder = make_folder(tmp_path, spm_file)
    tiny_tokenizer_json(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.pad_token_id) == (
        10,
        2,
        0,
    )
    assert tokenizer.encode("hello world") == [6, 7]
    assert tokenizer.encode("<|turn>user hello") == [4, 8, 6]
    assert tokenizer.apply_chat_template([user("hello")]) == [2, 4, 8, 6, 5, 4, 9]
    ids = [2, 6, 7, 5, 6]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world hello"
    for block in (1, 2):
        assert "".join(stream(tokenizer, ids, block)) == tokenizer.decode(ids)


def test_tokenizer_json_without_bos(tmp_path):
    tiny_tokenizer_json(tmp_path, with_bos=False)
    with pytest.raises(ValueError, match="bos_token '<bos>' is not in the vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_without_template_or_markers_a_prompt_is_raw_text_and_training_refuses_unknowns(
    tmp_path,
):
    from pathlib import Path

    from mlx_diffgemma.tuner.data import example_from_record, prompt_from_record

    toy = Path(__file__).resolve().parents[1] / "examples" / "sudoku_toy"
    folder = tmp_path / "toy"
    skip = shutil.ignore_patterns("model.safetensors", "chat_template.jinja", "*.csv")
    shutil.copytree(toy, folder, ignore=skip)
    tok = Tokenizer.from_pretrained(folder)  # a 16-symbol vocabulary, no chat template
    assert not tok.has_gemma4_markers
    user = [{"role": "user", "content": "0123"}]
    want = [tok.bos_token_id] + tok.encode("0123")  # raw text after BOS, as mlx-lm
    assert tok.apply_chat_template(user, add_generation_prompt=True) == want
    assert prompt_from_record({"prompt": "0123"}, tok) == want
    assert example_from_record({"prompt": "0123", "completion": "1"}, tok).prompt == want
    # A template writing a marker this vocabulary lacks: training refuses it in one line.
    (folder / "chat_template.jinja").write_text("{{ bos_token }}<|turn>{{ messages[0].content }}")
    tok = Tokenizer.from_pretrained(folder)
    for parse in (example_from_record, prompt_from_record):
        with pytest.raises(ValueError, match="unknown token at position 1") as e:
            parse({"prompt": "0123", "completion": "1"}, tok)
        assert "\n" not in str(e.value)
