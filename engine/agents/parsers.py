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

Every public parser is wrapped by `_never_raises`: a bug here turns into a FormatFailure whose reason
starts with "parser error", not into a crashed evaluation; tests/agents fuzz the unwrapped functions.
"""
from __future__ import annotations

import ast
import functools
import html
import re
import textwrap
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


# --- text clean-up shared by all roles ---------------------------------------------------------

_SPECIAL = re.compile(r"<\|(?:im_end|im_start|endoftext|eot_id|end|assistant|user)\|>|</s>|<s>|<\|fim_\w+\|>")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def clean(text: str) -> str:
    """Drop chat special tokens and <think> blocks a teacher model may emit."""
    text = _SPECIAL.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    stripped = _THINK.sub("", text)
    if stripped.strip():                                # (an answer that is all thinking is kept as is)
        text = stripped
    text = re.sub(r"\A(?:[ \t]*\n)+", "", text)       # leading blank lines; keep the first line's indent
    return text.rstrip()


def _unwrap(s: str) -> str:
    """Field text -> plain text: strip CDATA markers and XML escapes."""
    s = s.strip()
    s = re.sub(r"^<!\[CDATA\[", "", s)
    s = re.sub(r"\]\]>$", "", s.rstrip()).strip()
    s = s.replace("<![CDATA[", "").replace("]]>", "")
    if re.search(r"&(lt|gt|amp|quot|#\d+);", s):
        s = html.unescape(s)
    return s.strip()


# --- XML-ish fields ----------------------------------------------------------------------------

def _open_re(tag: str) -> re.Pattern:
    return re.compile(rf"<\s*{tag}(?:\s[^<>]*)?>", re.I)


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
    starts = [m for m in _PROBLEM_OPEN.finditer(body)]
    chunks = []
    if starts:
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(body)
            c = _PROBLEM_CLOSE.search(body, m.end(), end)
            if not c:
                repairs.append(f"unclosed <problem> {i + 1}")
            chunks.append(body[m.end(): c.start() if c else end])
    else:
        descs = list(_open_re("description").finditer(body))
        if descs:
            repairs.append("no <problem> elements: split on <description>")
            for i, m in enumerate(descs):
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


def _parse_plan(text: str) -> Plan | FormatFailure:
    text = clean(text)
    repairs = []
    for tag in ("planning", "plan"):
        val, closed = _field(text, tag)
        if val is not None and val.strip():
            repairs.append(f"plan inside <{tag}>" + ("" if closed else " (unclosed)"))
            text = _unwrap(val)
            break
    text = re.sub(r"^\s*#*\s*(modified |revised )?plan(ning)?\s*:?\s*\n", "", text, flags=re.I).strip()
    if code_blocks(text):
        repairs.append("plan contains code")
    if len(re.sub(r"\W", "", text)) < 8:
        return FormatFailure("planner", "empty plan", _excerpt(text))
    return Plan(text, repairs)


_NUM = r"(\d+(?:\.\d+)?)"


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


def code_blocks(text: str) -> list[Block]:
    """Fenced blocks, tolerant of unclosed fences, fences glued to the last code line, and a new
    opening fence before the previous block was closed."""
    blocks, cur, lang, start = [], None, "", 0
    for i, line in enumerate(text.split("\n")):
        s = line.strip()
        if cur is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+#.-]*)\s*(.*)$", s)
            if m:
                cur, lang, start = [], m.group(2).lower(), i
                if _looks_like_code(m.group(3)) and "`" not in m.group(3):   # ```python x = 1 (one line)
                    cur.append(m.group(3))
            continue
        if re.fullmatch(r"(`{3,}|~{3,})", s):
            blocks.append(Block(lang, "\n".join(cur), True, start))
            cur = None
        elif re.match(r"`{3,}\s*[A-Za-z]", s):                      # new block opens, old one never closed
            blocks.append(Block(lang, "\n".join(cur), False, start))
            m = re.match(r"`{3,}\s*([\w+#.-]*)", s)
            cur, lang, start = [], m.group(1).lower(), i
        elif s.endswith("```") and not s.startswith("```"):        # `    return x```
            cur.append(line[: line.rstrip().rfind("```")])
            blocks.append(Block(lang, "\n".join(cur), True, start))
            cur = None
        else:
            cur.append(line)
    if cur is not None:
        blocks.append(Block(lang, "\n".join(cur), False, start))
    return blocks


@functools.lru_cache(maxsize=1024)
def compiles(code: str) -> bool:
    """Does it compile as a Python module? (Cached: the same candidate is checked from several places.)"""
    if not code.strip():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                         # SyntaxWarning for odd escapes
            compile(code, "<answer>", "exec", dont_inherit=True)      # unlike ast.parse, rejects a bare `return`
        return True
    except Exception:                                               # SyntaxError, ValueError (NUL), Recursion
        return False


_CODE_LINE = re.compile(r"^(def |class |import |from \w|@\w|async def |if __name__|for |while |with |try:|"
                        r"print\(|return\b|[A-Za-z_][\w, \[\]]*\s*[+\-*/]?=[^=])")


def _looks_like_code(code: str) -> bool:
    return any(_CODE_LINE.match(line.strip()) for line in code.split("\n"))


def _defines(code: str, name: str | None) -> bool:
    return bool(name) and re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


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


_REGION_START = re.compile(r"(def |class |import |from [\w.]+ import|@\w|async def |"
                           r"[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)*\s*=[^=])")


def _is_prose(line: str) -> bool:
    """An unindented line of English ("This reads the input.", "Note: ..."), not a Python statement."""
    s = line.rstrip()
    return (bool(re.match(r"[A-Za-z]+:?(?: [\w'`\",.;:()/-]+){2,}$", s)) and not s.endswith((":", ",", "(", "[", "{", "\\"))
            and not compiles(s))


def _code_region(text: str) -> str | None:
    """Unfenced answer: the first region that starts at a code-looking line, runs until a line of prose,
    and compiles (trailing lines are dropped a few at a time until it does)."""
    lines = text.split("\n")
    starts = [i for i, l in enumerate(lines) if _REGION_START.match(l)][:8]
    for s in starts:
        end = next((j for j in range(s + 1, len(lines)) if _is_prose(lines[j])), len(lines))
        for _ in range(12):
            while end > s and not lines[end - 1].strip():
                end -= 1
            if end <= s:
                break
            chunk = "\n".join(lines[s:end])
            if compiles(chunk):
                return chunk
            end -= 1
    return None


def _drop_unfinished_tail(code: str, entry_point: str | None) -> str | None:
    """A program cut off mid-statement -> its longest prefix of whole top-level statements that compiles
    (and still defines the entry point, when there is one); None when there is no such prefix."""
    lines = code.split("\n")
    cuts = [i for i, l in enumerate(lines) if i and l[:1].strip() and not l.startswith(("#", ")", "]", "}"))]
    for i in reversed(cuts[-20:]):
        head = "\n".join(lines[:i]).rstrip()
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
    if not starter_code.strip() or not compiles(starter_code):
        return code
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


def _parse_debugger(text: str, entry_point: str | None = None, starter_code: str = "") -> Code | FormatFailure:
    out = _parse_code(text, "debugger", entry_point, starter_code)
    if isinstance(out, Code):
        out.plan = _unwrap(re.sub(r"^\s*#*\s*(modified |revised |new )?plan(ning)?\s*:?\s*", "", out.plan,
                                  flags=re.I))
    return out


parse_retriever = _never_raises("retriever")(_parse_retriever)
parse_plan = _never_raises("planner")(_parse_plan)
parse_confidence = _never_raises("planner")(_parse_confidence)
parse_code = _never_raises("coder")(_parse_code)
parse_debugger = _never_raises("debugger")(_parse_debugger)
