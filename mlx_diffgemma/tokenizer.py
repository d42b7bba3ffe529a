"""Tokenizer: tokenizer.json or SentencePiece loading, the Gemma 4 chat template, streaming text."""

import json
import re
import secrets
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .diffusion.config import read_json

# What the Gemma 4 chat template writes for an image part.
IMAGE_PLACEHOLDER = "<|image|>"

# generation_config.json of google/diffusiongemma-26B-A4B-it: <eos>, <turn|>, <|tool_response>.
DEFAULT_EOS_TOKEN_IDS = (1, 106, 50)

# The special-token names a template may use; values are overridden by tokenizer_config.json.
_SPECIAL_TOKENS = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}

# Gemma 4 markers (<|turn>, <turn|>, <|"|>, ...) and <mask>: the pieces HF marks special.
# SentencePiece files them as user-defined, next to plain pieces such as "\n\n" and "<table>".
_MARKER = re.compile(r"<mask>|<\|\S*>|<\S*\|>")

# Thinking output: `<|channel>thought\n...<channel|>answer`.
_THOUGHT_OPEN = "<|channel>thought"
_THOUGHT_CLOSE = "<channel|>"
# A channel header that escaped into the answer: a bare `<|channel>`, or a `thought`/`final`
# name whose marker was dropped by the decoder (Rapid-MLX PR #554 strips the same).
_LEAKED_HEADER = re.compile(r"(?:<\|channel>)?(?:thought|final)\n|<\|channel>")


class _SentencePiece:
    """Google's tokenizer.model, run by sentencepiece itself (exact Gemma 4 merges)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):
            raise ValueError(
                f"{path} is not a SentencePiece model (corrupt or truncated); download it again."
            ) from None
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.piece_to_id(token)  # unknown pieces map to <unk>
        return i if self._sp.id_to_piece(i) == token else None

    def special_pieces(self) -> List[str]:
        """The special pieces `encode` matches in text (control pieces it never does)."""
        sp = self._sp
        pieces = (sp.id_to_piece(i) for i in range(self.vocab_size))
        return [p for p in pieces if _MARKER.fullmatch(p)]

    def _special(self, i: int) -> bool:
        sp = self._sp
        return sp.is_control(i) or sp.is_unknown(i) or bool(_MARKER.fullmatch(sp.id_to_piece(i)))

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        # sentencepiece drops control pieces (<bos>, <eos>, <pad>) and prints <unk> as " ⁇ ";
        # write special tokens ourselves so both backends give the same text.
        out, run = [], []
        for i in ids:
            if self._special(i):
                out.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


class _TokenizersJSON:
    """A Hugging Face tokenizer.json, run by the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise ValueError(
                f"{path} is not a valid tokenizer.json ({e}); download it again."
            ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        # The chat template writes <bos> itself; the post-processor must not add another.
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def special_pieces(self) -> List[str]:
        """The added tokens `encode` matches in text: special ones and Gemma markers."""
        added = self._tok.get_added_tokens_decoder().values()
        return [t.content for t in added if t.special or _MARKER.fullmatch(t.content)]

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class StreamingDetokenizer:
    """Turns blocks of token ids into text deltas.

    The deltas concatenate to `tokenizer.decode(all_ids)`. A block that ends inside a
    UTF-8 character (byte-fallback tokens) has that character held back until the next
    block or `finalize`, so no delta carries half a character.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # One id of left context, then the ids whose text is not fully emitted yet.
        self._ids: List[int] = []
        self._sent = 0  # characters of decode(self._ids) already emitted

    def _decode(self, ids: List[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add_tokens(self, ids: Sequence[int]) -> str:
        """Add a block of ids and return the new text."""
        self._ids.extend(int(i) for i in ids)
        text = self._decode(self._ids)
        # An unfinished character decodes to up to 3 U+FFFD (one per pending byte).
        held = min(3, len(text) - len(text.rstrip("\ufffd")))
        end = max(self._sent, len(text) - held)
        delta, self._sent = text[self._sent : end], end
        if end == len(text):
            # Restart from the last id: it keeps the neighbour that decoders which join or
            # strip at token boundaries (WordLevel, Metaspace) need, and bounds the work.
            self._ids = self._ids[-1:]
            self._sent = len(self._decode(self._ids))
        return delta

    def finalize(self) -> str:
        """Return the held-back text (a truncated character decodes as U+FFFD) and reset."""
        delta = self._decode(self._ids)[self._sent :]
        self._ids, self._sent = [], 0
        return delta


class Tokenizer:
    """The DiffusionGemma tokenizer: encode/decode, chat template, eos ids, streaming text."""

    def __init__(
        self,
        backend: Union[_SentencePiece, _TokenizersJSON],
        special_tokens: Dict[str, str],
        eos_token_ids: Sequence[int],
        chat_template: Optional[str] = None,
    ):
        self._backend = backend
        self._special = special_tokens
        self._eos = list(eos_token_ids)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self._bos_id = backend.token_to_id(special_tokens["bos_token"])
        self._pad_id = backend.token_to_id(special_tokens["pad_token"])
        self._guard: Optional[_TextGuard] = None  # built on first use (a vocabulary scan)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "Tokenizer":
        """Load the tokenizer of a checkpoint folder.

        `tokenizer.json` is used when present, else the SentencePiece `tokenizer.model`.
        `tokenizer_config.json` (special tokens, chat template), `chat_template.jinja` and
        `generation_config.json` (`eos_token_id`) are read when present.

        Args:
            path: the checkpoint folder.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: the folder has neither tokenizer file.
            ValueError: a config value is malformed, or the vocabulary lacks bos/pad.
        """
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            backend = _TokenizersJSON(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            # Never let transformers convert the .model: its merge order differs from SPM's.
            backend = _SentencePiece(path / "tokenizer.model")
        else:
            raise FileNotFoundError(
                f"No tokenizer.json or tokenizer.model in {path}; pass a checkpoint folder that has one."
            )
        config = _read_json(path / "tokenizer_config.json")
        special = {}
        for name, default in _SPECIAL_TOKENS.items():
            token = config.get(name) or default
            special[name] = token["content"] if isinstance(token, dict) else token
        for name in ("bos_token", "pad_token"):
            if backend.token_to_id(special[name]) is None:
                raise ValueError(
                    f"{name} {special[name]!r} is not in the vocabulary of {path}; "
                    f"set {name} in its tokenizer_config.json."
                )
        eos = _read_json(path / "generation_config.json").get("eos_token_id", DEFAULT_EOS_TOKEN_IDS)
        eos = [eos] if isinstance(eos, int) else eos
        if not isinstance(eos, (list, tuple)) or not all(isinstance(i, int) for i in eos):
            raise ValueError(
                f"eos_token_id {eos!r} in {path / 'generation_config.json'} must be an int or a list of ints."
            )
        return cls(backend, special, eos, _read_template(path, config))

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def eos_token_ids(self) -> List[int]:
        return list(self._eos)

    @property
    def bos_token(self) -> str:
        return self._special["bos_token"]

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, with no BOS added; markers such as `<|turn>` map to their ids.

        Raises:
            ValueError: `text` holds a lone surrogate or an undecodable byte (as Python
                keeps one from a non-UTF-8 command line), named with its position.
        """
        check_text(text)
        return self._backend.encode(text)

    def protect(self, text: str) -> str:
        """`text` with every special piece (`<turn|>`, `<|tool_call>`, ...) replaced by a
        placeholder that `encode_rendered` encodes as ordinary text; see `_TextGuard`."""
        return self._text_guard().protect(text)

    def protect_messages(self, messages: Sequence[dict]) -> List[dict]:
        """Chat messages whose text is `protect`ed (an assistant turn's thoughts are
        dropped first, as the Gemma 4 template drops them, since their markers will not
        be seen as markers any more)."""
        out = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if m.get("role") in ("assistant", "model") and isinstance(content, str):
                content = _strip_thoughts(content)
            if isinstance(content, str):
                m["content"] = self.protect(content)
            elif isinstance(content, list):
                m["content"] = [self._protect_part(p) for p in content]
            out.append(m)
        return out

    def _protect_part(self, part):
        if (
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            return {**part, "text": self.protect(part["text"])}
        return part

    def encode_rendered(self, text: str) -> List[int]:
        """Ids of a rendered prompt: a leading BOS mapped, the template's markers special,
        `protect`ed message text as ordinary tokens."""
        ids = []
        if text.startswith(self.bos_token):
            # sentencepiece never matches control pieces in text, so map the <bos> here.
            ids, text = [self.bos_token_id], text[len(self.bos_token) :]
        return ids + self._text_guard().encode(self, text)

    def _text_guard(self) -> "_TextGuard":
        if self._guard is None:
            self._guard = _TextGuard(self._backend.special_pieces())
        return self._guard

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops `<bos>`, `<|turn>`, `<channel|>`, ..."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (see `StreamingDetokenizer`)."""
        return StreamingDetokenizer(self, skip_special_tokens)

    @property
    def has_gemma4_markers(self) -> bool:
        """The vocabulary holds the built-in chat format's turn markers as tokens."""
        return all(self._backend.token_to_id(m) is not None for m in ("<|turn>", "<turn|>"))

    def unknown_ids(self, ids: Sequence[int]) -> List[int]:
        """Positions in `ids` of the unknown token (text the vocabulary cannot hold)."""
        unk = self._backend.token_to_id(self._special.get("unk_token", "<unk>"))
        return [i for i, t in enumerate(ids) if unk is not None and t == unk]

    def apply_chat_template(
        self,
        messages: List[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tokenize: bool = True,
    ) -> Union[List[int], str]:
        """Render a conversation as a prompt.

        The checkpoint's Jinja template is used when it has one (rendered as transformers
        does); otherwise the built-in Gemma 4 format (`render_gemma4_chat`) when the
        vocabulary holds its markers; otherwise raw text: BOS + the messages' text (as
        mlx-lm renders a prompt without a template). The generate command, the server,
        `lora` and `distill` all render through here.

        Args:
            messages: dicts with `role` (system, user, assistant or model) and `content`.
            add_generation_prompt: end with an open model turn.
            enable_thinking: ask for a thinking block before the answer.
            tokenize: return token ids (BOS included) instead of the text.

        Returns:
            Token ids, or the prompt text when `tokenize` is False. Token ids never hold
            a control token written in a message: message text is `protect`ed, so a
            `<turn|>` typed by a user costs several ordinary tokens instead of closing
            the turn (the template's own markers stay special).
        """
        if tokenize:
            messages = self.protect_messages(messages)
        if self._template is not None:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                **self._special,
            )
        elif self.has_gemma4_markers:
            text = render_gemma4_chat(
                messages, add_generation_prompt, enable_thinking, self.bos_token
            )
        else:  # no template, no Gemma 4 markers: raw text after BOS, as mlx-lm does
            text = self.bos_token + "\n\n".join(_content(m) for m in messages)
        if not tokenize:
            return text
        return self.encode_rendered(text)


def check_text(text: str, where: str = "The text"):
    """ValueError naming the first character of `text` that is not text: a lone surrogate,
    or an undecodable byte kept as one (Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = (
            f"the undecodable byte 0x{c - 0xDC00:02x}"
            if 0xDC80 <= c <= 0xDCFF
            else f"a lone surrogate U+{c:04X}"
        )
        raise ValueError(f"{where} holds {what} at character {e.start}; give UTF-8 text.") from None


class _TextGuard:
    """Keeps message text from becoming control tokens.

    `protect` replaces each special piece in a text with a placeholder (private-use
    characters around a per-process random tag and the piece's index) that no template
    changes and no tokenizer merges; `encode` encodes the text around placeholders as
    usual and each placeholder as its piece's characters, split until no special piece
    matches (`<turn|>` -> `<` + `turn|>`). A client cannot forge a placeholder usefully:
    it only ever becomes ordinary tokens.
    """

    def __init__(self, pieces: Sequence[str]):
        self.pieces = sorted(set(pieces), key=len, reverse=True)
        self.tag = secrets.token_hex(6)
        alternatives = "|".join(re.escape(p) for p in self.pieces) or r"(?!x)x"
        self.find = re.compile(alternatives)
        self.placeholder = re.compile("\ue000" + self.tag + r"(\d+)\ue001")
        self.index = {p: i for i, p in enumerate(self.pieces)}

    def protect(self, text: str) -> str:
        return self.find.sub(lambda m: f"\ue000{self.tag}{self.index[m.group()]}\ue001", text)

    def encode(self, tokenizer: "Tokenizer", text: str) -> List[int]:
        ids, pos = [], 0
        for m in self.placeholder.finditer(text):
            ids += tokenizer.encode(text[pos : m.start()])
            ids += self.plain(tokenizer, self.pieces[int(m.group(1))])
            pos = m.end()
        return ids + tokenizer.encode(text[pos:])

    def plain(self, tokenizer: "Tokenizer", text: str) -> List[int]:
        """Ids of `text` with no special piece matched (split into smaller runs until none is)."""
        ids = tokenizer.encode(text)
        if len(text) == 1 or not any(tokenizer.decode([i]) in self.index for i in ids):
            return ids
        return self.plain(tokenizer, text[:1]) + self.plain(tokenizer, text[1:])


def render_gemma4_chat(
    messages: List[dict],
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    bos_token: str = "<bos>",
) -> str:
    """Render messages in the Gemma 4 chat format (as the release's chat template does).

    Used only when the checkpoint carries no chat template. The format:
    `<bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{user}<turn|>\\n<|turn>model\\n`.
    Contents are trimmed. With `enable_thinking` the system turn starts with
    `<|think|>\\n`; without a system message that turn holds only `<|think|>\\n`, as the
    Gemma 4 Jinja template renders it. Model turns in the history drop their
    `<|channel>...<channel|>` thoughts. A system (or developer) message is allowed only first.

    Args:
        messages: dicts with `role` and `content` (a string or a list of text and image
            parts; an image part renders as `<|image|>`, each text part trimmed).
        add_generation_prompt: end with `<|turn>model\\n`.
        enable_thinking: put `<|think|>` in the system turn.
        bos_token: the text of the BOS token.

    Returns:
        The prompt text.
    """
    out = [bos_token]
    messages = list(messages)
    system = None
    if messages and messages[0].get("role") in ("system", "developer"):
        system = _content(messages.pop(0)).strip()
    if system is not None or enable_thinking:
        think = "<|think|>\n" if enable_thinking else ""
        out.append(f"<|turn>system\n{think}{system or ''}<turn|>\n")
    for m in messages:
        role = m.get("role")
        if role == "user":
            out.append(f"<|turn>user\n{_content(m).strip()}<turn|>\n")
        elif role in ("assistant", "model"):
            out.append(f"<|turn>model\n{_strip_thoughts(_content(m)).strip()}<turn|>\n")
        else:
            raise ValueError(
                f"Message role {role!r} is not supported by the built-in Gemma 4 template; "
                "use user, assistant or model (system only first)."
            )
    if add_generation_prompt:
        out.append("<|turn>model\n")
    return "".join(out)


def split_thinking(text: str) -> Tuple[Optional[str], str]:
    """Split a model answer (decoded with special tokens kept) into thinking and answer.

    `<|channel>thought\\n{thinking}<channel|>{answer}` gives `(thinking, answer)`; a block
    not closed yet gives `(thinking so far, "")`; text without a block gives
    `(None, text)`. A channel header leaked at the start of the answer (a bare
    `<|channel>`, or `thought\\n` / `final\\n` left after the decoder dropped the marker)
    is removed. Thinking and answer are otherwise returned verbatim.

    Args:
        text: the generated text.

    Returns:
        `(thinking, answer)`; `thinking` is None when there is no thinking block.
    """
    thinking = None
    if text.startswith(_THOUGHT_OPEN):
        body = text[len(_THOUGHT_OPEN) :].removeprefix("\n")
        thinking, closed, text = body.partition(_THOUGHT_CLOSE)
        if not closed:
            return thinking, ""
    leak = _LEAKED_HEADER.match(text)
    return thinking, text[leak.end() :] if leak else text


def _content(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        # As the Gemma 4 template: each text part trimmed, one placeholder per image
        # (expanded to the image's soft tokens when the prompt is encoded).
        if part.get("type") == "text":
            parts.append(part["text"].strip())
        elif part.get("type") == "image":
            parts.append(IMAGE_PLACEHOLDER)
        else:
            raise ValueError(
                f"Content part type {part.get('type')!r} is not supported; "
                "use text and image parts."
            )
    return "".join(parts)


def _strip_thoughts(text: str) -> str:
    # As the Gemma 4 template's strip_thinking: drop each `<|channel>...<channel|>` span.
    return "".join(p.split("<|channel>")[0] for p in text.split(_THOUGHT_CLOSE))


def _read_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _read_template(path: Path, config: dict) -> Optional[str]:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as older transformers saved them
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None:
            raise ValueError(
                f"tokenizer_config.json in {path} has named chat templates but no 'default' one; add it."
            )
    return template


def _compile_template(source: str):
    # The environment transformers renders chat templates in (utils/chat_template_utils.py).
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}` marks assistant text for transformers' masks; render it plainly.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters.
        return json.dumps(
            x,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
