# tests/golden/tokenizers/make_golden.py: provenance of the tokenizer cases (not run by the tests).
# Makes two small tokenizers in Hugging Face's on-disk formats and records what transformers'
# tokenizer classes (the ones diffusers' FLUX / Wan pipelines load) make of a list of prompts:
#   clip/  CLIPTokenizer files (vocab.json, merges.txt, ...) built from the first 4000 merges of
#          OpenAI's CLIP BPE (bpe_simple_vocab_16e6.txt.gz, shipped in the open_clip_torch wheel:
#          pip download open_clip_torch --no-deps; pass the .gz path as argv[1]) with CLIP's vocab
#          construction (the 512 byte symbols, merges, <|startoftext|>, <|endoftext|>).
#   t5/    a SentencePiece unigram model (nmt_nfkc normalisation, as T5's) trained on the text of
#          argv[2] (any English text), saved through T5TokenizerFast (tokenizer.json, spiece.model).
#   cases.json  prompts -> input_ids (and attention_mask) as the pipelines call the tokenizers:
#          CLIP padding="max_length", max_length=77, truncation=True; T5 the same with
#          max_length=32 and 64 (FluxPipeline: 512, WanPipeline: 512 / 226).
# Run: /tmp/wanref/bin/python make_golden.py bpe_simple_vocab_16e6.txt.gz corpus.txt
import gzip, json, os, sys
import sentencepiece as spm
import transformers
from transformers import CLIPTokenizer, T5TokenizerFast

here = os.path.dirname(os.path.abspath(__file__))

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b); cs.append(2 ** 8 + n); n += 1
    return dict(zip(bs, [chr(c) for c in cs]))

# ---- CLIP ----
lines = gzip.open(sys.argv[1]).read().decode("utf-8").split("\n")
merges = [tuple(l.split()) for l in lines[1:1 + 4000]]
vocab = list(bytes_to_unicode().values())
vocab = vocab + [v + "</w>" for v in vocab]
for m in merges: vocab.append("".join(m))
vocab.extend(["<|startoftext|>", "<|endoftext|>"])
cdir = os.path.join(here, "clip")
os.makedirs(cdir, exist_ok=True)
json.dump({v: i for i, v in enumerate(vocab)}, open(os.path.join(cdir, "vocab.json"), "w"), ensure_ascii=False)
with open(os.path.join(cdir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
    for m in merges: f.write(" ".join(m) + "\n")
ctok = CLIPTokenizer(os.path.join(cdir, "vocab.json"), os.path.join(cdir, "merges.txt"), pad_token="<|endoftext|>")
ctok.save_pretrained(cdir)
ctok = CLIPTokenizer.from_pretrained(cdir)

# ---- T5 ----
# T5Tokenizer.from_pretrained on a folder holding only spiece.model converts it (tokenizers'
# Unigram + the model's precompiled nmt_nfkc charsmap) the way transformers does for FLUX's
# tokenizer_2; tokenizer.json is that conversion. tokenizer_legacy.json is the same model with the
# normalizer / pre-tokenizer of the tokenizer.json files published in 2023-24 (FLUX.1-dev's,
# google/umt5-xxl's): Sequence[Precompiled, Replace(" {2,}" -> " ")] and a lone Metaspace.
import shutil, tempfile
from tokenizers import Tokenizer
tdir = os.path.join(here, "t5")
os.makedirs(tdir, exist_ok=True)
prefix = os.path.join(tdir, "spiece")
spm.SentencePieceTrainer.train(input=sys.argv[2], model_prefix=prefix, vocab_size=600, model_type="unigram",
                               normalization_rule_name="nmt_nfkc", character_coverage=0.9995, pad_id=0, eos_id=1,
                               unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                               max_sentence_length=100000, input_sentence_size=200000, shuffle_input_sentence=False)
os.remove(prefix + ".vocab")
src = tempfile.mkdtemp()
shutil.copy(prefix + ".model", src)
ttok = T5TokenizerFast.from_pretrained(src, extra_ids=10)
ttok.save_pretrained(tdir)
ttok = T5TokenizerFast.from_pretrained(tdir)
tj = json.load(open(os.path.join(tdir, "tokenizer.json")))
pc = tj["normalizer"] if tj["normalizer"]["type"] == "Precompiled" else tj["normalizer"]["normalizers"][0]
tj["normalizer"] = {"type": "Sequence", "normalizers": [pc, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
json.dump(tj, open(os.path.join(tdir, "tokenizer_legacy.json"), "w"), ensure_ascii=False)
legacy = Tokenizer.from_file(os.path.join(tdir, "tokenizer_legacy.json"))
# and transformers 4.4x's SpmConverter: Strip(right) and runs of spaces to one "\u2581"
tj["normalizer"] = {"type": "Sequence", "normalizers": [pc, {"type": "Strip", "strip_left": False, "strip_right": True},
                    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]}
json.dump(tj, open(os.path.join(tdir, "tokenizer_strip.json"), "w"), ensure_ascii=False)
stripv = Tokenizer.from_file(os.path.join(tdir, "tokenizer_strip.json"))

# a byte-fallback model (as google/umt5-xxl's, Wan's tokenizer): unknown characters become <0xXX>
bdir = os.path.join(here, "t5_bytefallback")
os.makedirs(bdir, exist_ok=True)
bprefix = os.path.join(bdir, "spiece")
spm.SentencePieceTrainer.train(input=sys.argv[2], model_prefix=bprefix, vocab_size=700, model_type="unigram",
                               normalization_rule_name="nmt_nfkc", character_coverage=0.98, byte_fallback=True,
                               pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                               unk_piece="<unk>", max_sentence_length=100000, input_sentence_size=200000,
                               shuffle_input_sentence=False)
os.remove(bprefix + ".vocab")
bsrc = tempfile.mkdtemp()
shutil.copy(bprefix + ".model", bsrc)
btok = T5TokenizerFast.from_pretrained(bsrc, extra_ids=0)
btok.save_pretrained(bdir)
btok = T5TokenizerFast.from_pretrained(bdir)
os.remove(bprefix + ".model")
# transformers' conversion writes byte_fallback false; the same file with it true (what a
# tokenizer.json may say) is read by tokenizers itself for the byte-fallback ids
bjson = json.load(open(os.path.join(bdir, "tokenizer.json")))
bjson["model"]["byte_fallback"] = True
bf_on = Tokenizer.from_str(json.dumps(bjson))

def t5_ids(tok, p, n):   # what T5TokenizerFast(p, padding="max_length", max_length=n, truncation=True) gives
    ids = tok.encode(p, add_special_tokens=False).ids[: n - 1] + [1]
    return ids + [0] * (n - len(ids)), [1] * len(ids) + [0] * (n - len(ids))

prompts = [
    "a photo of a cat",
    "A Photo of a CAT, sitting on a mat!",
    "An astronaut riding a horse on Mars, 4k, highly detailed, trending on artstation",
    "  leading and   repeated    spaces\tand a tab\nand a newline  ",
    "it's what we've done, they'll see; I'm sure she'd agree",
    "numbers 1234567 and 3.14159, 2nd place, 100%",
    "punctuation!!! ??? ... --- (parentheses) [brackets] {braces} \"quotes\" #hash @at",
    "Café déjà vu, naïve façade, Zürich, São Paulo, Ærøskøbing",
    "ＦＵＬＬ－ｗｉｄｔｈ ｌｅｔｔｅｒｓ and the ﬁ ligature, ① ② ③, ½",
    "日本語のテキスト と 中文 텍스트",
    "emoji 🐱🚀 and symbols © ® ™ € £ ¥",
    "",
    "a",
    "<|startoftext|>a prompt with special tokens<|endoftext|>",
    "word " * 100,
    "unbelievably-long-hyphenated-compound-words-keep-going",
    "MiXeD CaSe WoRdS with_underscores and CamelCaseWords",
    "Ελληνικά και Русский текст",
    "non\u00a0breaking\u2009thin\u3000ideographic spaces",
]
cases = []
for p in prompts:
    c = ctok(p, padding="max_length", max_length=77, truncation=True)
    t32 = ttok(p, padding="max_length", max_length=32, truncation=True)
    t64 = ttok(p, padding="max_length", max_length=64, truncation=True)
    l64, lm64 = t5_ids(legacy, p, 64)
    r64, _ = t5_ids(Tokenizer.from_file(os.path.join(tdir, "tokenizer.json")), p, 64)
    assert r64 == t64["input_ids"], (p, r64, t64["input_ids"])
    cases.append({"prompt": p, "clip_input_ids": c["input_ids"], "t5_input_ids_32": t32["input_ids"],
                  "t5_legacy_input_ids_64": l64, "t5_legacy_tokens": legacy.encode(p, add_special_tokens=False).tokens,
                  "t5_strip_input_ids_64": t5_ids(stripv, p, 64)[0],
                  "t5_bytefallback_input_ids_64": btok(p, padding="max_length", max_length=64, truncation=True)["input_ids"],
                  "t5_bytefallback_tokens": btok.tokenize(p),
                  "t5_bytefallback_on_input_ids_64": t5_ids(bf_on, p, 64)[0],
                  "t5_attention_mask_32": t32["attention_mask"], "t5_input_ids_64": t64["input_ids"],
                  "t5_attention_mask_64": t64["attention_mask"],
                  "clip_tokens": ctok.tokenize(p), "t5_tokens": ttok.tokenize(p)})
# the variants differ from tokenizer.json only in these two entries ("PRECOMPILED" stands for
# tokenizer.json's Precompiled normalizer); the big files themselves are not kept
variants = {}
for name in ("legacy", "strip"):
    vj = json.load(open(os.path.join(tdir, "tokenizer_%s.json" % name)))
    for n in vj["normalizer"]["normalizers"]:
        if n["type"] == "Precompiled": n["precompiled_charsmap"] = "PRECOMPILED"
    variants[name] = {"normalizer": vj["normalizer"], "pre_tokenizer": vj["pre_tokenizer"]}
    os.remove(os.path.join(tdir, "tokenizer_%s.json" % name))
os.remove(os.path.join(tdir, "spiece.model"))          # tokenizer.json carries everything
# the byte-fallback model's charsmap is t5/tokenizer.json's (same normalization rule): kept once
bj = json.load(open(os.path.join(bdir, "tokenizer.json")))
assert bj["normalizer"]["precompiled_charsmap"] == pc["precompiled_charsmap"]
bj["normalizer"]["precompiled_charsmap"] = "PRECOMPILED"
json.dump(bj, open(os.path.join(bdir, "tokenizer.json"), "w"), ensure_ascii=False)
os.remove(os.path.join(cdir, "tokenizer.json"))         # FLUX's tokenizer folder has vocab + merges only
json.dump({"transformers": transformers.__version__, "clip_class": type(ctok).__name__,
           "t5_class": type(ttok).__name__, "t5_variants": variants, "cases": cases},
          open(os.path.join(here, "cases.json"), "w"), ensure_ascii=False, indent=1)
print("ok", type(ctok).__name__, type(ttok).__name__, len(cases))
