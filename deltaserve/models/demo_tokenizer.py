"""The demo tokenizer: a small byte-level BPE with Qwen's special tokens and chat template.

Every `make-model` checkpoint ships this tokenizer. It is trained at make-model time on the
embedded corpus below (deterministic: fixed corpus and trainer settings), so the repo carries no
tokenizer file and needs no hub access. Byte-level means every UTF-8 string round-trips.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

BPE_VOCAB_SIZE = 2000
# Appended after the BPE vocab (as in Qwen, where <|endoftext|> follows the merges).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen-style: one `<|im_start|>{role}\n{content}<|im_end|>\n` block per message; content is a
# string or a list of {"type": "text", "text": ...} parts. `enable_thinking=false` pre-fills an
# empty think block after the generation prompt, as Qwen3.5's template does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{%- set content = message.content -%}"
    "{%- elif message.content is none -%}{%- set content = '' -%}"
    "{%- else -%}{%- set content = message.content | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)

ANIMALS = (
    "cat dog fox owl horse rabbit tiger lion elephant dolphin whale penguin bear wolf eagle "
    "turtle frog mouse deer otter panda giraffe zebra monkey kangaroo koala octopus shark "
    "squirrel hedgehog badger beaver camel crow duck goose parrot raccoon seal snail spider "
    "swan bee butterfly cow pig sheep goat chicken hawk falcon lizard snake crab salmon"
).split()

_PARAGRAPHS = """\
Once upon a time, in a small village at the edge of a great forest, there lived a curious \
young fox. Every morning she walked to the river, watched the water, and wondered where it went.
The old owl who lived in the oak tree told her that the river ran all the way to the sea. \
"How far is the sea?" asked the fox. "Three days and three nights," said the owl, "if you \
do not stop to rest."
So the fox packed a little bag with bread, cheese and an apple, and she started her journey. \
On the first day she met a rabbit who was afraid of the dark. On the second day she met a \
bear who had lost his way home. On the third day she met a turtle who knew every story ever told.
They travelled together, and they helped each other. When they finally reached the sea, the \
sun was setting and the sky was red, orange and gold. The fox laughed, because the world was \
much bigger than she had ever imagined.
The weather today is sunny with a light wind from the west. Tomorrow it will be cloudy, and \
there may be rain in the afternoon. Temperatures will stay between 12 and 18 degrees.
Please write a short answer. What is the capital of France? The capital of France is Paris. \
What is 2 + 2? It is 4. What is 10 * 12? It is 120. Count from 1 to 10: 1, 2, 3, 4, 5, 6, 7, \
8, 9, 10.
The engine reads the request, schedules the tokens, runs the model and returns the answer. \
A good system is simple, fast and correct; it should also be easy to read and to test.
In the year 2024, the team built a new library for machine learning. They wrote code in \
Python, tested it every day, and shipped version 1.0 after 365 days of work.
She said: "I can't believe it's already 9:30!" He replied, "Don't worry; we'll be there in \
5 minutes." They ran (quickly) through the park -- past the lake, the trees & the bridge.
Email: hello@example.com, phone: +1 (555) 123-4567, price: $19.99, discount: 25%, ratio 3/4.
def main():\n    print("hello, world")\n    return 0\n
{"name": "demo", "values": [1, 2, 3], "ok": true}
"""

_WORDS = """\
the be to of and a in that have I it for not on with he as you do at this but his by from \
they we say her she or an will my one all would there their what so up out if about who get \
which go me when make can like time no just him know take people into year your good some \
could them see other than then now look only come its over think also back after use two how \
our work first well way even new want because any these give day most us is are was were been \
has had did said story write word words long short happy sad big small old young friend \
family home house tree river sea sky sun moon star night morning evening water fire earth \
wind forest mountain village city road journey adventure brave kind clever quiet loud fast \
slow red blue green yellow black white brown gold silver one two three four five six seven \
eight nine ten hundred thousand million first second third last next end begin beginning \
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May \
June July August September October November December yes no please thank thanks hello hi \
able above across act action add afraid again against age ago agree air allow almost alone \
along already although always among amount animal another answer appear apple area arm army \
around arrive art ask attention autumn away baby bad bag ball bank bed before behind believe \
below best better between bird bit blood boat body bone book born both bottom box boy bread \
break bright bring brother build burn business busy buy call calm car care carry catch cause \
center chair chance change charge cheap check child children choose church circle class clean \
clear climb clock close cloud coat cold color common complete contain continue control cook \
cool copy corner correct cost count country course cover create cross crowd cry cup current \
cut dance danger dark daughter dead deal dear decide deep degree desert design detail develop \
die difference different difficult dinner direction discover distance doctor door double down \
draw dream dress drink drive drop dry during early easy eat edge effect egg either else enemy \
energy enjoy enough enter equal escape every evening event exact example except excite expect \
experience explain eye face fact fall far farm father fear feel few field fight figure fill \
final find fine finish fish flat floor flower fly follow food foot force form forward free \
fresh front fruit full game garden gentle gift girl glad glass grass gray great ground group \
grow guess hair half hand happen hard hat head hear heart heavy help here hide high hill hold \
hole hope hot hour huge human hundred hungry hunt hurry idea imagine important inside island \
job join jump keep key king kitchen knee knife lady lake land language large late laugh lay \
lead learn leave left leg less letter level lie life lift light line list listen little live \
lost love low machine main map mark market matter meet memory middle mind minute miss moment \
money month mother move music name nation nature near need never noise north nose note nothing \
notice number ocean offer office often open order paper parent part party pass past path pay \
peace pencil person picture piece place plan plant play point poor position power present \
pretty problem produce promise protect proud pull push question quick rain reach read ready \
reason remember rest rich ride right ring rise rock room round rule run safe sail salt same \
save school science season seat secret seem sell send sense serve set shape share ship shoe \
shop shore shout show side sign silent simple sing sister sit size skin sleep smile snow soft \
soldier song soon sound south space speak special speed spend spring square stand start stay \
step still stone stop storm straight strange street strong student study summer surprise \
table talk teach team tell test thing thought through throw today together tomorrow tonight \
touch toward town track train travel true trust try turn under until voice wait walk wall warm \
wash watch wave weak wear week weight west whole wide wife wild win window winter wish woman \
wonder wood world worry wrong yard yesterday young Python code function return value error \
request response model token tokens server client engine batch cache memory kernel layer \
café naïve résumé déjà vu über straße 你好 世界 谢谢 中文 日本語 こんにちは 🙂 😀 👍 ❤️ ✓ → € £ ¥
"""


def corpus() -> list[str]:
    """The fixed training corpus (paragraphs, common words, digits, benchmark prompts)."""
    lines = _PARAGRAPHS.splitlines() + _WORDS.split()
    lines += [str(n) for n in range(0, 101)] + ["1000", "2000", "500", "100-word", "1000-word"]
    lines += list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    for animal in ANIMALS:
        article = "an" if animal[0] in "aeiou" else "a"
        prompt = f"Write a 1000-word story about {article} {animal}."
        # Repeated so the whole prompt merges into a handful of tokens.
        lines += [prompt] * 8 + [f"The {animal} was happy.", f"A story about the {animal}."]
    return lines


def train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on `corpus()` and append the special tokens (trained once per process)."""
    return Tokenizer.from_str(_trained_json())


@functools.cache
def _trained_json() -> str:
    # The BPE trainer breaks ties deterministically, so ids are reproducible even multi-threaded
    # (checked with RAYON_NUM_THREADS=8 across processes, tokenizers 0.23).
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Id of each special token, e.g. {"<|im_end|>": 2002, ...}."""
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for t, i in special_token_ids(tok).items()
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                   "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)]}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    logger.debug("demo tokenizer: %d tokens", tok.get_vocab_size())
