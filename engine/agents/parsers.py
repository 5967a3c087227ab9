"""Parsers for the agents' answers. Each returns a value or a `FormatFailure`; none of them raises.

    from engine.agents import parsers as P
    r = P.parse_retriever(text, k=2)        # Retrieval(examples=[Example], algorithm, repairs) | FormatFailure
    r = P.parse_plan(text)                  # Plan(text, repairs)                                 | FormatFailure
    r = P.parse_confidence(text)            # Confidence(score 0..100, explanation, repairs)      | FormatFailure
    r = P.parse_code(text, role="coder", entry_point="f", starter_code=...)  # Code(code, plan, repairs) | ...
    r = P.parse_debugger(text, entry_point=..., starter_code=...)            # Code with the revised plan

Small models rarely follow a format exactly, so the parsers are tolerant and say what they repaired
(`repairs`, recorded in the trace); they fail only when the answer lacks what the next agent needs:
no recalled example, no plan text, no confidence number, no code. What is tolerated:

  XML   no regex over a real XML parser (real answers are not XML: `a < b` in code, nested or unclosed
        tags, CDATA in odd places, ```xml fences, prose around <root>). Each field is the text between
        <tag> and </tag>, or, when the closing tag is missing, up to the next sibling's opening tag.
  code  several fenced blocks: the one that defines the entry point, is labelled Python, and compiles
        wins; among equals the last one that is not much shorter than the longest (a draft then a final
        version -> the final; a solution then a usage snippet -> the solution). No fence: the text, or
        its longest code-looking region, if it compiles. Unclosed fence (answer cut at max tokens): up to
        the end. A function body without its `def` line (HumanEval completion style): glued under the
        starter code's signature. Imports and helper functions from the starter code that the answer
        leaves out are put back, so the result is a whole program.

Time: every parser is linear in the answer's length (no regular expression here backtracks
quadratically; tests/agents/test_agents_parsers.py times adversarial 100 kB answers). Checking that a
candidate compiles is the one costly step (CPython compiles ~1 us/char), so one parse call compiles at
most COMPILE_BUDGET characters in all and no candidate over MAX_COMPILE characters: past either limit
`compiles` answers False ("not checked"), and a fenced block is still taken as it is. Loops that run
once per element are capped where a looping model could make them long: the first MAX_PROBLEMS <problem>
elements are read (a repair says so), an unfenced region's end is looked for among the first
PROSE_CANDIDATES prose-looking lines.

Every public parser is wrapped by `_never_raises`: a bug here turns into a FormatFailure whose reason
starts with "parser error", not into a crashed evaluation; tests/agents fuzz the unwrapped functions.
"""
from __future__ import annotations

import ast
import bisect
import collections
import contextvars
import functools
import itertools
import html
import re
import textwrap
import threading
import warnings
from dataclasses import dataclass, field


@dataclass
class FormatFailure:
    role: str
    reason: str
    excerpt: str = ""          # the start and end of the answer, for the trace

    def __bool__(self):        # `if not result:` reads as "parsing failed"
        return False


@dataclass
class Example:
    description: str
    code: str = ""
    planning: str = ""


@dataclass
class Retrieval:
    examples: list[Example]
    algorithm: str = ""
    repairs: list[str] = field(default_factory=list)


@dataclass
class Plan:
    text: str
    repairs: list[str] = field(default_factory=list)


@dataclass
class Confidence:
    score: int
    explanation: str = ""
    repairs: list[str] = field(default_factory=list)


@dataclass
class Code:
    code: str                  # a whole program, ready for eval.harness.run_tests
    plan: str = ""             # text before the code block (the debugger's revised plan; CoT's reasoning)
    repairs: list[str] = field(default_factory=list)


def _excerpt(text: str, n: int = 160) -> str:
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= 2 * n else text[:n] + " [...] " + text[-n:]


def _never_raises(role: str):
    def wrap(fn):
        @functools.wraps(fn)
        def safe(text, *args, **kw):
            try:
                if not isinstance(text, str):
                    return FormatFailure(role, f"answer is {type(text).__name__}, not text", _excerpt(text))
                return fn(text, *args, **kw)
            except Exception as e:                      # noqa: BLE001 -- the boundary: count, never crash
                return FormatFailure(kw.get("role", role), f"parser error: {type(e).__name__}: {e}", _excerpt(text))
        safe.unsafe = fn                                # the raw function, for the fuzz tests
        return safe
    return wrap


# --- compiling candidates, on a budget ----------------------------------------------------------

MAX_COMPILE = 24_000           # characters: a longer candidate is not compiled inside a parse call
COMPILE_BUDGET = 48_000        # characters compiled in all by one parse call (cache hits are free)


class _Budget:
    def __init__(self, chars: int):
        self.chars = chars


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("parsers_compile_budget", default=None)


def _compile_budget(fn):
    """Give a parse call (and the parsers it calls) one COMPILE_BUDGET, unless it runs inside one."""
    @functools.wraps(fn)
    def run(*args, **kw):
        if _budget.get() is not None:
            return fn(*args, **kw)
        token = _budget.set(_Budget(COMPILE_BUDGET))
        try:
            return fn(*args, **kw)
        finally:
            _budget.reset(token)
    return run


_compiled: dict[str, bool] = {}            # code -> compiles? (the 1024 newest; read without the lock)
_compiled_lock = threading.Lock()
COMPILE_CALL_CHARS = 64                    # what one compile() call costs on top of its text, in characters


def compiles(code: str) -> bool:
    """Does it compile as a Python module? Cached: the same candidate is checked from several places.
    Inside a parse call, False also means "not checked": over MAX_COMPILE or past the call's budget."""
    if not code.strip():
        return False
    known = _compiled.get(code)
    if known is not None:
        return known
    budget = _budget.get()
    if budget is not None:
        cost = len(code) + COMPILE_CALL_CHARS
        if len(code) > MAX_COMPILE or cost > budget.chars:
            return False
        budget.chars -= cost
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                         # SyntaxWarning for odd escapes
            compile(code, "<answer>", "exec", dont_inherit=True)      # unlike ast.parse, rejects a bare `return`
        ok = True
    except Exception:                                               # SyntaxError, ValueError (NUL), Recursion
        ok = False
    with _compiled_lock:
        _compiled[code] = ok
        if len(_compiled) > 1024:
            del _compiled[next(iter(_compiled))]           # the oldest
    return ok


# --- text clean-up shared by all roles ---------------------------------------------------------

_SPECIAL = re.compile(r"<\|(?:im_end|im_start|endoftext|eot_id|end|assistant|user)\|>|</s>|<s>|<\|fim_\w+\|>")
_THINK_OPEN, _THINK_CLOSE = re.compile(r"<think>", re.I), re.compile(r"</think>", re.I)


def _drop_think(text: str) -> str:
    """What `re.sub(r"<think>.*?</think>", "", text, flags=re.S | re.I)` returns, in linear time: that
    regex rescans to the end from every unclosed <think> (100 kB of "<think>": 7 s)."""
    out, pos = [], 0
    while True:
        o = _THINK_OPEN.search(text, pos)
        c = _THINK_CLOSE.search(text, o.end()) if o else None
        if c is None:                                   # no (further) closed block: the rest stays
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:o.start()])
        pos = c.end()


def clean(text: str) -> str:
    """Drop chat special tokens and <think> blocks a teacher model may emit."""
    text = _SPECIAL.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    stripped = _drop_think(text)
    if stripped.strip():                                # (an answer that is all thinking is kept as is)
        text = stripped
    text = re.sub(r"\A(?:[ \t]*\n)+", "", text)       # leading blank lines; keep the first line's indent
    return text.rstrip()


_ENTITY = re.compile(r"&(lt|gt|amp|quot|#\d+);")


def _unwrap(s: str) -> str:
    """Field text -> plain text: strip CDATA markers and XML escapes."""
    s = s.strip()
    s = s.removeprefix("<![CDATA[")
    s = s.rstrip().removesuffix("]]>").strip()
    s = s.replace("<![CDATA[", "").replace("]]>", "")
    if _ENTITY.search(s):
        s = html.unescape(s)
    return s.strip()


# --- XML-ish fields ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _open_re(tag: str) -> re.Pattern:
    return re.compile(rf"<\s*{tag}(?:\s[^<>]*)?>", re.I)


@functools.lru_cache(maxsize=None)
def _close_re(tag: str) -> re.Pattern:
    return re.compile(rf"<\s*/\s*{tag}\s*>", re.I)


def _field(text: str, tag: str, stops: tuple[str, ...] = ()) -> tuple[str | None, bool]:
    """The text of the first <tag>...</tag>; when unclosed, up to the first opening or closing tag in
    `stops` (sibling / parent tags) or the end. Returns (text or None when absent, closed?)."""
    m = _open_re(tag).search(text)
    if not m:
        return None, False
    rest = text[m.end():]
    c = _close_re(tag).search(rest)
    end, closed = (c.start(), True) if c else (len(rest), False)
    for s in stops:                                     # a sibling opens before our closing tag -> unclosed
        for pat in (_open_re(s), _close_re(s)):
            o = pat.search(rest, 0, end)
            if o and o.start() < end:
                end, closed = o.start(), False
    return rest[:end], closed


_PROBLEM_OPEN = re.compile(r"<\s*problem(?:[\s_-]*\d+)?(?:\s[^<>]*)?>", re.I)
_PROBLEM_CLOSE = re.compile(r"<\s*/\s*problem(?:[\s_-]*\d+)?\s*>", re.I)


def _strip_fences(s: str) -> str:
    """Code in an XML field, maybe inside its own ``` fence."""
    blocks = code_blocks(s)
    return blocks[0].code.strip("\n") if blocks else s


def _strip_tags(s: str) -> str:
    return re.sub(r"</?[A-Za-z_][\w-]*>", "", s)


MAX_PROBLEMS = 64


@_compile_budget
def _parse_retriever(text: str, k: int | None = None) -> Retrieval | FormatFailure:
    text = clean(text)
    repairs = []
    if re.search(r"```\s*xml", text, re.I):
        repairs.append("```xml fence around the XML")
    # The examples are everything but the <algorithm> element (usually last; sometimes first, or unclosed).
    alg_at = _open_re("algorithm").search(text)
    body = text
    if alg_at:
        c = _close_re("algorithm").search(text, alg_at.end())
        nxt = _PROBLEM_OPEN.search(text, alg_at.end())
        end = c.end() if c else (nxt.start() if nxt else len(text))
        if nxt and nxt.start() < end:
            end = nxt.start()
        body = text[: alg_at.start()] + "\n" + text[end:]
    # At most MAX_PROBLEMS elements are read (one more is found, to end the last one): a model that loops on
    # <problem> costs time per element, and only the first k are used.
    starts = list(itertools.islice(_PROBLEM_OPEN.finditer(body), MAX_PROBLEMS + 1))
    chunks = []
    if starts:
        if len(starts) > MAX_PROBLEMS:
            repairs.append(f"more than {MAX_PROBLEMS} <problem> elements: the rest not read")
        for i, m in enumerate(starts[:MAX_PROBLEMS]):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(body)
            c = _PROBLEM_CLOSE.search(body, m.end(), end)
            if not c:
                repairs.append(f"unclosed <problem> {i + 1}")
            chunks.append(body[m.end(): c.start() if c else end])
    else:
        descs = list(itertools.islice(_open_re("description").finditer(body), MAX_PROBLEMS + 1))
        if descs:
            repairs.append("no <problem> elements: split on <description>")
            if len(descs) > MAX_PROBLEMS:
                repairs.append(f"more than {MAX_PROBLEMS} <description> elements: the rest not read")
            for i, m in enumerate(descs[:MAX_PROBLEMS]):
                end = descs[i + 1].start() if i + 1 < len(descs) else len(body)
                chunks.append(body[m.start(): end])
    examples = []
    for i, chunk in enumerate(chunks):
        fields = {}
        for tag in ("description", "code", "planning"):
            others = tuple(t for t in ("description", "code", "planning") if t != tag)
            val, closed = _field(chunk, tag, others)
            if val is not None and not closed:
                repairs.append(f"unclosed <{tag}> in problem {i + 1}")
            fields[tag] = _unwrap(val) if val is not None else ""
        fields["code"] = _strip_fences(fields["code"])
        if not fields["description"]:
            repairs.append(f"problem {i + 1} has no description: dropped")
            continue
        examples.append(Example(fields["description"], fields["code"], fields["planning"]))
    if not examples:
        return FormatFailure("retriever", "no recalled problem with a <description>", _excerpt(text))
    if k is not None and len(examples) != k:
        repairs.append(f"{len(examples)} problems recalled, {k} asked")
        examples = examples[:k]
    algorithm = ""
    if alg_at:
        val, closed = _field(text, "algorithm", ("root", "problem"))
        if not closed:
            repairs.append("unclosed <algorithm>")
        algorithm = _unwrap(_strip_tags(_unwrap(val or "")))
    else:
        repairs.append("no <algorithm>")
    return Retrieval(examples, algorithm, repairs)


# "## Plan:" heading. `\s*#*\s*` and `\s*:?\s*` backtracked quadratically through a run of spaces.
_PLAN_HEADING = re.compile(r"^\s*(?:#+\s*)?(modified |revised )?plan(ning)?(?:\s*:)?\s*\n", re.I)


@_compile_budget
def _parse_plan(text: str) -> Plan | FormatFailure:
    text = clean(text)
    repairs = []
    for tag in ("planning", "plan"):
        val, closed = _field(text, tag)
        if val is not None and val.strip():
            repairs.append(f"plan inside <{tag}>" + ("" if closed else " (unclosed)"))
            text = _unwrap(val)
            break
    text = _PLAN_HEADING.sub("", text).strip()
    if code_blocks(text):
        repairs.append("plan contains code")
    if len(re.sub(r"\W", "", text)) < 8:
        return FormatFailure("planner", "empty plan", _excerpt(text))
    return Plan(text, repairs)


_NUM = r"(\d+(?:\.\d+)?)"


@_compile_budget
def _parse_confidence(text: str) -> Confidence | FormatFailure:
    text = clean(text)
    repairs = []
    explanation, _ = _field(text, "explanation", ("confidence",))
    explanation = _unwrap(explanation) if explanation is not None else ""
    num = None
    val, closed = _field(text, "confidence", ("explanation", "root"))
    if val is not None:
        m = re.search(_NUM + r"\s*(%|/\s*100)?", _unwrap(val))
        if m:
            num, unit = m.group(1), m.group(2)
            if not closed:
                repairs.append("unclosed <confidence>")
    if num is None:
        m = re.search(r"confidence[^\d\n]{0,30}?" + _NUM + r"\s*(%|/\s*100)?", text, re.I)
        if not m:
            return FormatFailure("planner", "no confidence number", _excerpt(text))
        num, unit = m.group(1), m.group(2)
        repairs.append("no <confidence> tag")
    x = float(num)
    if "." in num and x <= 1.0 and not unit:
        x *= 100
        repairs.append("confidence given as a fraction")
    if x > 100:
        repairs.append(f"confidence {num} clipped to 100")
        x = 100
    return Confidence(int(round(x)), explanation, repairs)


# --- code ---------------------------------------------------------------------------------------

_PY_LANGS = {"python", "python3", "py", "py3", "python 3", "pycon", "ipython"}


@dataclass
class Block:
    lang: str                  # "" when the fence has no label
    code: str
    closed: bool
    start: int                 # line index of the opening fence: text before it is the "plan"


_FENCE_OPEN = re.compile(r"(`{3,}|~{3,})\s*([\w+#.-]*)\s*(.*)$")
_FENCE_ONLY = re.compile(r"(`{3,}|~{3,})")
_FENCE_NEW = re.compile(r"`{3,}\s*([A-Za-z][\w+#.-]*|)")       # group 1 non-empty: a labelled fence


def code_blocks(text: str) -> list[Block]:
    """Fenced blocks, tolerant of unclosed fences, fences glued to the last code line, and a new
    opening fence before the previous block was closed.

    Only lines holding ``` or ~~~ change the state; the Python loop visits those alone (a block's lines
    are a slice), so 100 kB of short lines costs one split, not a regex call per line."""
    lines = text.split("\n")
    blocks, cur, lang, start = [], None, "", 0        # cur: (first piece or None, index of the next line)
    for i in [i for i, line in enumerate(lines) if "```" in line or "~~~" in line]:
        line = lines[i]
        s = line.strip()
        if cur is None:
            m = _FENCE_OPEN.match(s)
            if m:
                rest = m.group(3)                                             # ```python x = 1 (one line)
                first = rest if rest and "`" not in rest and _looks_like_code(rest) else None
                cur, lang, start = (first, i + 1), m.group(2).lower(), i
            continue
        body = ([cur[0]] if cur[0] is not None else []) + lines[cur[1]:i]
        new = _FENCE_NEW.match(s)
        if _FENCE_ONLY.fullmatch(s):
            blocks.append(Block(lang, "\n".join(body), True, start))
            cur = None
        elif new and new.group(1):                                    # new block opens, old one never closed
            blocks.append(Block(lang, "\n".join(body), False, start))
            cur, lang, start = (None, i + 1), new.group(1).lower(), i
        elif s.endswith("```") and not s.startswith("```"):        # `    return x```
            blocks.append(Block(lang, "\n".join(body + [line[: line.rstrip().rfind("```")]]), True, start))
            cur = None
    if cur is not None:
        body = ([cur[0]] if cur[0] is not None else []) + lines[cur[1]:]
        blocks.append(Block(lang, "\n".join(body), False, start))
    return blocks


# `[\w, \[\]]*\s*` would backtrack quadratically through a run of spaces (both classes take them; a 40 kB
# line of spaces: 12 s); `(?:[^\S ]\s*)?` matches the same lines: after the greedy class, whitespace that
# does not start with a space (a space would have been taken by the class).
_CODE_LINE = re.compile(r"^(def |class |import |from \w|@\w|async def |if __name__|for |while |with |try:|"
                        r"print\(|return\b|[A-Za-z_][\w, \[\]]*(?:[^\S ]\s*)?[+\-*/]?=[^=])")


def _looks_like_code(code: str) -> bool:
    return any(map(_CODE_LINE.match, map(str.strip, code.split("\n"))))


def _defines(code: str, name: str | None) -> bool:
    # [^\S\n] (not \s) after ^: a match of \s* across blank lines is also one from the last line start, and
    # \s* made every line start rescan a long run of blank lines (quadratic)
    return bool(name) and re.search(rf"^[^\S\n]*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _pick_block(blocks: list[Block], entry_point: str | None) -> Block | None:
    cands = [b for b in blocks if b.code.strip() and (b.lang in _PY_LANGS or b.lang == "")]
    cands = [b for b in cands if b.lang or _looks_like_code(b.code)]          # unlabelled output blocks out
    if not cands:
        return None
    key = {id(b): (_defines(b.code, entry_point), b.lang in _PY_LANGS, compiles(b.code)) for b in cands}
    best = max(key.values())
    top = [b for b in cands if key[id(b)] == best]
    longest = max(len(b.code.strip()) for b in top)
    return [b for b in top if len(b.code.strip()) * 2 >= longest][-1]


# Whole-text (re.M) forms of per-line patterns: [^\S\n] for \s and [^=\n] for [^=] keep a match on its line.
_REGION_START = re.compile(r"^(?:def |class |import |from [\w.]+ import|@\w|async def |"
                           r"[A-Za-z_]\w*(?:[^\S\n]*,[^\S\n]*[A-Za-z_]\w*)*[^\S\n]*=[^=\n])", re.M)
_PROSE = re.compile(r"^[A-Za-z]+:?(?: [\w'`\",.;:()/-]+){2,}[^\S\n]*$", re.M)


def _is_prose(line: str) -> bool:
    """An unindented line of English ("This reads the input.", "Note: ..."), not a Python statement."""
    s = line.rstrip()
    return (bool(_PROSE.match(s)) and not s.endswith((":", ",", "(", "[", "{", "\\"))
            and not compiles(s))


PROSE_CANDIDATES = 2000


def _code_region(text: str) -> str | None:
    """Unfenced answer: the first region that starts at a code-looking line, runs until a line of prose,
    and compiles (trailing lines are dropped a few at a time until it does).

    Works on character offsets with whole-text regex searches; prose lines are found by one scan shared by
    all starts, which looks at no more than PROSE_CANDIDATES prose-looking lines (a region that long is far
    past anything compiled: see MAX_COMPILE)."""
    candidates = itertools.islice(_PROSE.finditer(text), PROSE_CANDIDATES)
    prose: list[int] = []                               # offsets of prose lines found so far, in order

    def first_prose_from(pos: int) -> int:
        i = bisect.bisect_left(prose, pos)
        if i < len(prose):
            return prose[i]
        for p in candidates:
            if _is_prose(p.group()):
                prose.append(p.start())
                if p.start() >= pos:
                    return p.start()
        return len(text)

    for m in itertools.islice(_REGION_START.finditer(text), 8):
        s = m.start()
        end = first_prose_from(text.find("\n", s) + 1 or len(text))
        for _ in range(12):
            chunk = text[s:end].rstrip()                # trailing blank lines out
            if not chunk:
                break
            if compiles(chunk):
                return chunk
            cut = chunk.rfind("\n")                     # drop the last line
            if cut < 0:
                break
            end = s + cut
    return None


_TOP_LEVEL = re.compile(r"^[^\s#)\]}]", re.M)       # a line that starts a top-level statement


def _drop_unfinished_tail(code: str, entry_point: str | None) -> str | None:
    """A program cut off mid-statement -> its longest prefix of whole top-level statements that compiles
    (and still defines the entry point, when there is one); None when there is no such prefix."""
    cuts = collections.deque((m.start() for m in _TOP_LEVEL.finditer(code) if m.start()), maxlen=20)
    for at in reversed(cuts):
        head = code[:at].rstrip()
        if compiles(head) and (not entry_point or _defines(head, entry_point)):
            return head
    return None


def _complete_body(code: str, entry_point: str, starter_code: str) -> str | None:
    """A body without its signature -> starter code (signature + docstring) + the body, indented.

    A completion often continues the prompt's last line, so its first line has lost its indent
    ("for x in xs:\n        y\n    return z"); both readings are tried, the one that compiles wins."""
    if not _defines(starter_code, entry_point) or not code.strip():
        return None
    lines = code.strip("\n").split("\n")
    rest = [len(l) - len(l.lstrip()) for l in lines[1:] if l.strip()]
    bodies = [textwrap.dedent("\n".join(lines))]
    if rest and min(rest) > 0 and not lines[0][:1].isspace():
        bodies.append(textwrap.dedent("\n".join([" " * min(rest) + lines[0]] + lines[1:])))
    fulls = [starter_code.rstrip() + "\n" + textwrap.indent(b, "    ") + "\n" for b in bodies]
    return next((f for f in fulls if compiles(f)), fulls[0])


def _quiet_parse(code: str) -> ast.Module:
    with warnings.catch_warnings():                     # "invalid escape sequence" in the model's regexes
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _with_starter_context(code: str, entry_point: str | None, starter_code: str) -> str:
    """Put back the starter code's imports and helper definitions the answer leaves out."""
    if not starter_code.strip() or not compiles(starter_code) or len(code) > MAX_COMPILE:
        return code                                     # (a candidate too long to check is taken as it is)
    try:
        tree = _quiet_parse(code)
        have = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                                                                 ast.AsyncFunctionDef))}
    except Exception:
        have = set()
    add = []
    for node in _quiet_parse(starter_code).body:
        seg = ast.get_source_segment(starter_code, node) or ""
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if seg and seg not in code:
                add.append(seg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            if node.name != entry_point and node.name not in have and seg:
                add.append(seg)
    return ("\n".join(add) + "\n\n" + code) if add else code


@_compile_budget
def _parse_code(text: str, role: str = "coder", entry_point: str | None = None,
                starter_code: str = "") -> Code | FormatFailure:
    text = clean(text)
    repairs = []
    blocks = code_blocks(text)
    block = _pick_block(blocks, entry_point)
    plan = ""
    if block is not None:
        code = block.code.strip("\n")
        plan = "\n".join(text.split("\n")[: block.start]).strip()
        if not block.closed:
            repairs.append("unclosed ``` fence")
            if not compiles(code):                              # cut off at the token limit mid-statement
                head = _drop_unfinished_tail(code, entry_point)
                if head is not None:
                    code = head
                    repairs.append("dropped the unfinished tail")
        if len([b for b in blocks if b.code.strip()]) > 1:
            repairs.append(f"{len(blocks)} code blocks: picked one")
    else:
        val, _ = _field(text, "code")
        if val is not None and compiles(_unwrap(val)):
            code = _unwrap(val)
            repairs.append("code inside <code> tags")
        elif compiles(text) and _looks_like_code(text):
            code = text
            repairs.append("no ``` fence")
        elif entry_point and starter_code and _looks_like_code(text) and \
                compiles(_complete_body(text, entry_point, starter_code) or ""):
            code = text                                             # a bare body: completed below
            repairs.append("no ``` fence")
        else:
            code = _code_region(text)
            if code is None:
                return FormatFailure(role, "no code block", _excerpt(text))
            repairs.append("no ``` fence: took the code-looking region")
    if entry_point and not _defines(code, entry_point) and starter_code.strip():
        full = _complete_body(code, entry_point, starter_code)
        if full is not None and (compiles(full) or not compiles(code)):
            code = full
            repairs.append("function body without its signature: added the starter code")
    if entry_point:
        code = _with_starter_context(code, entry_point, starter_code)
    if not code.strip():
        return FormatFailure(role, "empty code block", _excerpt(text))
    return Code(code.rstrip() + "\n", plan, repairs)


@_compile_budget
def _parse_debugger(text: str, entry_point: str | None = None, starter_code: str = "") -> Code | FormatFailure:
    out = _parse_code(text, "debugger", entry_point, starter_code)
    if isinstance(out, Code):
        out.plan = _unwrap(re.sub(r"^\s*(?:#+\s*)?(modified |revised |new )?plan(ning)?(?:\s*:)?\s*", "", out.plan,
                                  flags=re.I))
    return out


parse_retriever = _never_raises("retriever")(_parse_retriever)
parse_plan = _never_raises("planner")(_parse_plan)
parse_confidence = _never_raises("planner")(_parse_confidence)
parse_code = _never_raises("coder")(_parse_code)
parse_debugger = _never_raises("debugger")(_parse_debugger)
