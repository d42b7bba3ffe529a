"""Fill a gap in code, edit a word in place, and fill a JSON skeleton.

python examples/infill.py CHECKPOINT

Markup: [[hole]] or [[hole:N]] is a gap of N tokens (default 32); [[edit]]old[[/edit]]
starts from `old` and may change. Everything else is kept byte for byte.
"""

import sys

from mlx_diffgemma import generate_skeleton, infill, load

model, tokenizer = load(sys.argv[1])
ask = [{"role": "user", "content": "Complete the Python code."}]

# 1. A gap in the middle of a function: the text after it is clamped on the canvas.
code = "def mean(xs):\n    [[hole:12]]\n    return total / len(xs)\n"
result = infill(model, tokenizer, code, messages=ask, seed=0)
print(result.text)
print("fill:", repr(result.fills[0]))

# 2. Edit in place: the region starts as the old text and may change.
text = "The [[edit]]quick brown[[/edit]] fox jumps over the lazy dog."
print(infill(model, tokenizer, text, seed=0).text)

# 3. A JSON skeleton: keys, quotes and commas are fixed; holes are typed.
spec = {"city": "string:8", "population": "integer:9", "capital": "boolean"}
ask = [{"role": "user", "content": "Describe Paris as JSON."}]
r = generate_skeleton(model, tokenizer, spec, messages=ask, seed=0)
print(r.text)
print("valid" if r.ok else f"invalid: {'; '.join(r.problems)}")
