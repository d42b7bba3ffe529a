"""Text-level API: responses, trimming, stop, stats, cancellation, prompt cache, thinking.

Most tests drive `stream_generate` with a scripted model whose canvases are fixed token
ids, so the text is known; the real tiny checkpoint checks what needs real numerics.
"""

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlx_diffgemma import DiffusionConfig, PromptCache, generate, load, stream_generate
from mlx_diffgemma.generate import ineffective_settings

SKY = "Why is the sky blue?"
ANSWER = "The sky looks blue because air scatters blue light the most."
TURN_END = 106  # <turn|>, an EOS id


class Layer:
    """A cache layer that only counts positions."""

    def __init__(self):
        self.offset = 0

    @property
    def state(self):
        return mx.array(self.offset)


class ScriptedModel:
    """Stands in for `Model`: the canvas denoised at position P is the next `canvas_length`
    ids of `script` up to a `<turn|>` (filler after it), as very peaky logits.

    With stability_threshold 0 every canvas stops after one step. It counts decoder
    forwards and records every encoded chunk.
    """

    def __init__(self, script, canvas_length=4, context=4096, filler=236761, **settings):
        self.args = SimpleNamespace(
            vocab_size=262144,
            canvas_length=canvas_length,
            max_position_embeddings=context,
            final_logit_softcapping=None,
        )
        self.generation_config = DiffusionConfig(
            **{
                "max_new_tokens": 64,
                "max_denoising_steps": 3,
                "stability_threshold": 0,
                "eos_token_id": (1, 106, 50),
                **settings,
            }
        )
        self.script, self.filler = list(script), filler
        self.canvases = {}  # position -> canvas ids
        self.forwards = 0
        self.encoded = []

    def make_cache(self):
        return [Layer(), Layer()]

    def encode(self, ids, cache):
        self.encoded.append(ids[0].tolist())
        for c in cache:
            c.offset += ids.shape[1]

    def denoise(self, canvas, cache, **self_conditioning):
        self.forwards += 1
        C = self.args.canvas_length
        P = cache[0].offset
        if P not in self.canvases:
            taken = []
            while self.script and len(taken) < C and TURN_END not in taken:
                taken.append(self.script.pop(0))
            self.canvases[P] = taken + [self.filler] * (C - len(taken))
        ids = mx.array(self.canvases[P])
        hot = mx.arange(self.args.vocab_size)[None, None] == ids[None, :, None]
        return mx.where(hot, 30.0, -30.0)


def user(text):
    return [{"role": "user", "content": text}]


def answer_model(tok, text=ANSWER, eos=True, **kw):
    return ScriptedModel(tok.encode(text) + ([TURN_END] if eos else []), **kw)


def commits(responses):
    return [r for r in responses if r.kind == "commit"]


def test_commit_texts_concatenate_to_generate(tok):
    responses = list(stream_generate(answer_model(tok), tok, user(SKY), seed=0))
    assert [r.kind for r in responses] == ["commit"] * len(responses)
    assert len(responses) == len(tok.encode(ANSWER)) // 4 + 1
    assert "".join(r.text for r in responses) == ANSWER
    assert generate(answer_model(tok), tok, user(SKY), seed=0) == ANSWER
    ids = [i for r in responses for i in r.token_ids]
    assert ids == tok.encode(ANSWER)  # EOS excluded


def test_drafts_only_when_requested(tok):
    # stability_threshold 1: each canvas runs two steps, so two drafts per commit.
    model = answer_model(tok, stability_threshold=1)
    responses = list(stream_generate(model, tok, user(SKY), seed=0, drafts=True))
    kinds = [r.kind for r in responses]
    assert kinds[:3] == ["draft", "draft", "commit"]
    assert kinds.count("commit") == len(commits(responses)) and kinds.count(
        "draft"
    ) == 2 * kinds.count("commit")
    first = responses[0]
    assert first.draft_tokens == tuple(tok.encode(ANSWER)[:4])
    assert first.draft_text == tok.decode(first.draft_tokens)
    assert len(first.draft_accepted) == 4 and first.text == "" and first.step == 1
    assert responses[1].step == 2 and responses[2].block_index == 0
    plain = list(stream_generate(answer_model(tok, stability_threshold=1), tok, user(SKY), seed=0))
    assert [r.kind for r in plain] == ["commit"] * len(commits(responses))
    assert [r.text for r in plain] == [r.text for r in commits(responses)]
    assert all(r.draft_text is None and r.draft_tokens is None for r in plain)


def test_max_tokens_trims_the_output_not_the_computation(tok):
    model6 = answer_model(tok, eos=False)
    out6 = list(stream_generate(model6, tok, user(SKY), seed=0, max_tokens=6))
    model8 = answer_model(tok, eos=False)
    out8 = list(stream_generate(model8, tok, user(SKY), seed=0, max_tokens=8))
    ids = tok.encode(ANSWER)
    assert [i for r in out6 for i in r.token_ids] == ids[:6]
    assert [i for r in out8 for i in r.token_ids] == ids[:8]
    # ceil(6 / 4) = ceil(8 / 4) = 2 whole canvases either way.
    assert model6.canvases == model8.canvases and len(model6.canvases) == 2
    assert model6.forwards == model8.forwards
    assert out6[-1].finish_reason == "length" and out6[-1].generation_tokens == 6


@pytest.mark.parametrize(
    "max_tokens, finish, kept", [(4, "length", 4), (5, "stop", 5), (8, "stop", 5)]
)
def test_eos_past_max_tokens_is_length(tok, max_tokens, finish, kept):
    model = ScriptedModel(tok.encode(ANSWER)[:5] + [TURN_END], canvas_length=8)
    out = list(stream_generate(model, tok, user(SKY), seed=0, max_tokens=max_tokens))
    assert len(out) == 1 and out[0].finish_reason == finish
    assert out[0].token_ids == tuple(tok.encode(ANSWER)[:kept])


def test_final_response_carries_finish_reason_and_stats(tok):
    model = ScriptedModel(tok.encode(ANSWER)[:6] + [TURN_END])  # EOS in canvas 2, index 2
    prompt = tok.apply_chat_template(user(SKY))
    out = list(stream_generate(model, tok, user(SKY), seed=7))
    assert [r.finish_reason for r in out] == [None, "stop"]
    last = out[-1]
    assert last.prompt_tokens == len(prompt) and last.prompt_tps > 0
    assert last.generation_tokens == 6 and last.generation_tps > 0
    assert last.canvases == 2 and last.denoising_steps == (1, 1)
    # the output the user gets (EOS excluded) per decoder forward
    assert last.decoder_forwards == 2
    assert last.tokens_per_forward == pytest.approx(6 / 2)
    assert last.peak_memory >= 0 and last.seed == 7
    assert out[0].canvases == 1 and out[0].generation_tokens == 4


def test_real_model_max_tokens_keeps_a_prefix(tiny, tok):
    model, _ = tiny
    out3 = list(stream_generate(model, tok, user(SKY), seed=3, max_tokens=3))
    out8 = list(stream_generate(model, tok, user(SKY), seed=3, max_tokens=8))
    assert len(out3) == len(out8) == 1 and out3[0].finish_reason == "length"
    assert out3[0].token_ids == out8[0].token_ids[:3]
    # the same work, but only the output counts: 3 or 8 tokens over 2 forwards
    assert out3[0].decoder_forwards == out8[0].decoder_forwards == 2
    assert (out3[0].tokens_per_forward, out8[0].tokens_per_forward) == (3 / 2, 8 / 2)


def test_real_model_stops_on_the_checkpoint_eos(tiny_eos_checkpoint):
    model, tokenizer = load(tiny_eos_checkpoint)
    out = list(stream_generate(model, tokenizer, user(SKY), seed=0, max_tokens=32))
    assert len(out) == 1 and out[0].finish_reason == "stop" and out[0].text == ""
    # an EOS-only reply: no output, so no tokens per forward
    assert out[0].generation_tokens == 0 and out[0].tokens_per_forward == 0.0


def test_stopping_iteration_stops_the_work(tok):
    model = answer_model(tok, eos=False)
    cache = PromptCache(model)
    stream = stream_generate(model, tok, user(SKY), seed=0, drafts=True, prompt_cache=cache)
    assert next(stream).kind == "draft"
    assert next(stream).kind == "commit"
    forwards = model.forwards  # the loop may have built (not run) the next step already
    stream.close()
    assert model.forwards == forwards
    # The cache keeps what was fed and committed: the prompt, then canvas 0 (not encoded).
    prompt = tok.apply_chat_template(user(SKY))
    assert cache.tokens == prompt and cache.pending == tok.encode(ANSWER)[:4]
    assert cache.layers[0].offset == cache.offset == len(prompt)


def test_a_cache_interrupted_inside_an_encode_is_refused(tok):
    model = answer_model(tok, eos=False)
    encode = model.encode

    def interrupted(ids, cache):
        if len(model.encoded) == 1:  # the first canvas, after the prompt
            cache[0].offset += ids.shape[1]
            raise KeyboardInterrupt
        encode(ids, cache)

    model.encode = interrupted
    cache = PromptCache(model)
    with pytest.raises(KeyboardInterrupt):
        list(stream_generate(model, tok, user(SKY), seed=0, prompt_cache=cache))
    with pytest.raises(ValueError, match="interrupted while it was being written"):
        next(stream_generate(model, tok, user("Again?"), prompt_cache=cache))


def test_prompt_cache_encodes_only_the_new_tokens(tok):
    answer = tok.encode("Blue light scatters most.")
    model = ScriptedModel(answer + [TURN_END] + tok.encode("Yes.") + [TURN_END])
    cache = PromptCache(model)
    first = tok.apply_chat_template(user(SKY))
    assert (
        generate(model, tok, user(SKY), seed=0, prompt_cache=cache) == "Blue light scatters most."
    )
    # Every canvas but the last is encoded; the last one's answer waits, EOS dropped.
    n_full = len(answer) // 4 * 4
    assert cache.tokens == first + answer[:n_full] and cache.pending == answer[n_full:]
    model.encoded.clear()
    assert generate(model, tok, user("Sure?"), seed=0, prompt_cache=cache) == "Yes."
    new = tok.encode("<turn|>\n<|turn>user\nSure?<turn|>\n<|turn>model\n")
    assert model.encoded == [answer[n_full:] + new]
    assert cache.tokens == first + answer + new and cache.pending == tok.encode("Yes.")
    assert cache.layers[0].offset == cache.offset


def test_prompt_cache_matches_encoding_the_whole_conversation(tiny, tok):
    model, _ = tiny
    cache = PromptCache(model)
    answer = generate(model, tok, user(SKY), seed=1, prompt_cache=cache)
    second = list(stream_generate(model, tok, user("Sure?"), seed=2, prompt_cache=cache))
    conversation = user(SKY) + [{"role": "assistant", "content": answer}] + user("Sure?")
    whole = tok.apply_chat_template(conversation)
    # The babbled answer does not re-tokenize as it was generated, so the cache cannot
    # be continued: the whole conversation is encoded afresh, as a fresh call would.
    assert cache.reencoded and second[-1].prompt_tokens == len(whole)
    assert (cache.tokens + cache.pending)[: len(whole)] == whole
    fresh = list(stream_generate(model, tok, whole, seed=2))
    assert [r.token_ids for r in second] == [r.token_ids for r in fresh]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["gemma", "toy"])
def test_chat_of_three_turns_sees_the_whole_conversation(tiny, checkpoint):
    """Any chat template (the toy's drops answers; Gemma's echoes them): at every turn
    the model sees a fresh encoding of the whole conversation (issue 21)."""
    if checkpoint == "toy":
        model, tok = load(Path(__file__).resolve().parents[1] / "examples" / "sudoku_toy")
        turns = ["460200500004120306340520604102013065"] * 3
    else:
        model, tok = tiny
        turns = ["Hi.", "Why?", "Sure?"]
    cache, conversation = PromptCache(model), []
    for i, text in enumerate(turns):
        conversation.append({"role": "user", "content": text})
        out = list(
            stream_generate(model, tok, user(text), seed=i, prompt_cache=cache, max_tokens=8)
        )
        whole = tok.apply_chat_template(conversation)
        assert (cache.tokens + cache.pending)[: len(whole)] == whole, i
        conversation.append({"role": "assistant", "content": "".join(r.text for r in out)})
        assert cache.messages == conversation


def test_thinking_is_split_from_the_answer(tok):
    thinking, answer = "Air scatters short waves.", "Rayleigh scattering."
    text = f"<|channel>thought\n{thinking}<channel|>{answer}"
    # Two-token canvases: the markers land in different commits.
    model = ScriptedModel(tok.encode(text) + [TURN_END], canvas_length=2)
    out = list(stream_generate(model, tok, user(SKY), seed=0, enable_thinking=True))
    assert "".join(r.thinking for r in out) == thinking
    assert "".join(r.text for r in out) == answer
    assert model.encoded[0][:6] == [2, 105, 9731, 107, 98, 107]  # <|think|> in the system turn


@pytest.mark.parametrize("leak", ["thought\n", "final\n", "<|channel>"])
def test_leaked_channel_header_is_stripped(tok, leak):
    # One-token canvases: the header arrives token by token and is never emitted.
    model = ScriptedModel(tok.encode(leak + "Paris.") + [TURN_END], canvas_length=1)
    out = list(stream_generate(model, tok, user("Capital of France?"), seed=0))
    assert "".join(r.text for r in out) == "Paris."
    assert all("thought" not in r.text and "final" not in r.text for r in out)


def test_an_answer_that_only_looks_like_a_header_is_kept(tok):
    model = ScriptedModel(tok.encode("final") + [TURN_END], canvas_length=1)
    assert generate(model, tok, user("Last word?"), seed=0) == "final"


def test_errors_name_the_problem(tok):
    model = answer_model(tok, context=40)
    with pytest.raises(ValueError, match="prompt is empty"):
        next(stream_generate(model, tok, "  "))
    with pytest.raises(ValueError, match="more than the model's context of 40"):
        next(stream_generate(model, tok, "word " * 50))
    with pytest.raises(ValueError, match="lower max_tokens"):
        next(stream_generate(model, tok, user(SKY), max_tokens=32))
    with pytest.raises(ValueError, match="enable_thinking applies to chat-message prompts"):
        next(stream_generate(model, tok, SKY, enable_thinking=True))
    with pytest.raises(ValueError, match="max_denoising_steps must be a positive integer"):
        next(stream_generate(model, tok, SKY, max_denoising_steps=0))


def test_a_cached_conversation_rejects_a_new_system_prompt_or_thinking_mode(tok):
    model = answer_model(tok)
    cache = PromptCache(model)
    generate(model, tok, user(SKY), seed=0, prompt_cache=cache)
    with pytest.raises(ValueError, match="system message can only start a conversation"):
        next(
            stream_generate(
                model, tok, [{"role": "system", "content": "Be brief."}], prompt_cache=cache
            )
        )
    with pytest.raises(ValueError, match="no effect after the first turn"):
        next(stream_generate(model, tok, user("More?"), prompt_cache=cache, enable_thinking=True))


def test_ineffective_settings():
    assert ineffective_settings(DiffusionConfig()) == {}
    one = ineffective_settings(DiffusionConfig(max_denoising_steps=1))
    assert set(one) == {"t_min", "stability_threshold", "confidence_threshold"}
    assert set(
        ineffective_settings(DiffusionConfig(max_denoising_steps=4, stability_threshold=3))
    ) == {
        "stability_threshold",
        "confidence_threshold",
    }
    assert ineffective_settings(DiffusionConfig(max_denoising_steps=4, stability_threshold=2)) == {}
