"""Labelled agent answers for the parser tests: realistic small-model outputs, good and broken, each with
what the parser must make of it. Written by hand after the failure modes seen in published MapCoder runs
with 7B models (unclosed tags, CDATA inside CDATA, tags nested in <algorithm>, fences inside XML, prose
around the answer, usage snippets after the solution, function bodies without the signature, answers cut
at the token limit). Used by tests/agents/test_agents_parsers.py.

A case: (name, kind, context, text, expected). kind picks the parser (retriever | plan | confidence |
coder | debugger); context is "he" (a HumanEval-style function problem) or "io" (stdin/stdout); expected
is None for a format failure, else a dict of checks (see check_case in the test).
"""
from engine.agents.problem import Problem, Test

HE_STARTER = '''from typing import List


def below_zero(operations: List[int]) -> bool:
    """ You're given a list of deposit and withdrawal operations on a bank account that starts with
    zero balance. Your task is to detect if at any point the balance of account falls below zero, and
    at that point function should return True. Otherwise it should return False.
    >>> below_zero([1, 2, 3])
    False
    >>> below_zero([1, 2, -4, 5])
    True
    """
'''

HE = Problem(id="HumanEval/3", benchmark="humaneval", description=HE_STARTER, entry_point="below_zero",
             starter_code=HE_STARTER,
             sample_tests=[Test("assert", code="assert below_zero([1, 2, 3]) == False"),
                           Test("assert", code="assert below_zero([1, 2, -4, 5]) == True")],
             hidden_tests=[Test("assert", code="assert below_zero([]) == False"),
                           Test("assert", code="assert below_zero([1, -1, 2, -2, 5, -5, 4, -5]) == True")])

IO = Problem(id="cf/1", benchmark="xcodeeval",
             description="Given n integers, print their sum.\nInput: the first line holds n, the second the n "
                         "integers.\nOutput: one integer.",
             sample_tests=[Test("stdio", input="3\n1 2 3\n", expected="6\n")],
             hidden_tests=[Test("stdio", input="1\n-5\n", expected="-5\n")])

CONTEXTS = {"he": HE, "io": IO}

GOOD_BODY = """    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False"""

GOOD_FN = "def below_zero(operations: List[int]) -> bool:\n" + GOOD_BODY

CASES = [
    # ------------------------------------------------------------------ retriever
    ("retriever_clean", "retriever", "he", """<root>
<problem>
<description>
Given a list of integers, return True if any prefix sum is negative.
</description>
<code>
def has_negative_prefix(nums):
    s = 0
    for x in nums:
        s += x
        if s < 0:
            return True
    return False
</code>
<planning>
1. Keep a running sum starting at 0.
2. Add each number; if the sum drops below 0 return True.
3. Return False after the loop.
</planning>
</problem>
<problem>
<description>
Find the maximum prefix sum of an array.
</description>
<code>
def max_prefix(nums):
    best = s = 0
    for x in nums:
        s += x
        best = max(best, s)
    return best
</code>
<planning>
1. Track the running sum and the best value seen.
2. Return the best value.
</planning>
</problem>
<algorithm>
Prefix sums (a linear scan). Walk the array once and keep the running total; any question about "at some
point" becomes a check inside the loop. Complexity O(n).
</algorithm>
</root>""", {"n_examples": 2, "algorithm_contains": "Prefix sums", "code0_contains": "if s < 0:",
             "repairs": False}),

    ("retriever_xml_fence_and_prose", "retriever", "he", """Sure! Here are some relevant problems:

```xml
<root>
<problem>
<description>Check whether a bank balance ever becomes negative given a list of transactions.</description>
<code>
```python
def ever_negative(tx):
    bal = 0
    for t in tx:
        bal += t
        if bal < 0:
            return True
    return False
```
</code>
<planning>1. Start with balance 0. 2. Apply each transaction. 3. Report the first negative balance.</planning>
</problem>
<problem>
<description>Count how many times a running total crosses zero.</description>
<code>def crossings(xs): ...</code>
<planning>Scan once, compare the sign before and after each step.</planning>
</problem>
<algorithm>Simulation / prefix sum: simulate the process step by step.</algorithm>
</root>
```

I hope this helps!""", {"n_examples": 2, "code0_contains": "def ever_negative", "code0_not_contains": "```",
                         "algorithm_contains": "Simulation"}),

    ("retriever_cdata_everywhere", "retriever", "io", """<root>
<problem>
<description><![CDATA[
Read n numbers and print the largest one.
]]></description>
<code><![CDATA[
n = int(input())
a = list(map(int, input().split()))
print(max(a))
]]></code>
<planning><![CDATA[
1. Read n.
2. Read the list.
3. Print max(a).
]]></planning>
</problem>
<algorithm><![CDATA[
Linear scan: read all values and aggregate them in one pass.
]]></algorithm>
</root>""", {"n_examples": 1, "k": 1, "code0_contains": "print(max(a))", "code0_not_contains": "CDATA",
             "algorithm_contains": "Linear scan"}),

    ("retriever_nested_tags_in_algorithm", "retriever", "he", """<root>

<problem>
<description><![CDATA[
Problem 1: Check if a given string is a palindrome.
]]></description>
<code><![CDATA[
1. Define a function called `is_palindrome(s: str) -> bool`.
2. Compare s with s[::-1].
]]></code>
<planning><![CDATA[
1. Define the problem.
2. Compare characters from both ends.
]]></planning>
</problem>

<problem>
<description><![CDATA[
Problem 2: Find the first non-repeating character in a string.
]]></description>
<code><![CDATA[
Use a dictionary of counts.
]]></code>
<planning><![CDATA[
1. Count characters. 2. Scan again for count 1.
]]></planning>
</problem>

<problem>
<description><![CDATA[
Problem 3: Running balance of a list of operations.
]]></description>
<code><![CDATA[
Keep a running sum.
]]></code>
<planning><![CDATA[
1. Sum step by step.
]]></planning>
</problem>

<algorithm><![CDATA[
<description><![CDATA[
The algorithm used to solve the original problem is a variation of the Brute-force algorithm.
]]></description>
<tutorial>
1. Understand the problem.
2. Examine every candidate.
</tutorial>
]]></algorithm>
</root>""", {"n_examples": 3, "k": 3, "algorithm_contains": "Brute-force", "algorithm_not_contains": "<tutorial>",
             "description0_contains": "palindrome"}),

    ("retriever_truncated_at_token_limit", "retriever", "he", """<root>
<problem>
<description>Return True if the sum of a list is negative.</description>
<code>
def neg_sum(xs):
    return sum(xs) < 0
</code>
<planning>
1. Sum the list.
2. Compare with zero.
</planning>
</problem>
<problem>
<description>Given a list of daily profits, find the first day the cumulative profit is negative.</description>
<code>
def first_loss_day(p):
    total = 0
    for i, x in enumerate(p):
        total += x
        if total < 0:
            return i
    return -1
</code>
<planning>
1. Accumulate the profits.
2. Return the index where""", {"n_examples": 2, "repairs": True, "planning1_contains": "Accumulate"}),

    ("retriever_comparisons_in_code_no_cdata", "retriever", "io", """<root>
<problem>
<description>Sort the array and print pairs with a[i] < a[j] && i < j.</description>
<code>
a = sorted(map(int, input().split()))
cnt = 0
for i in range(len(a)):
    for j in range(i + 1, len(a)):
        if a[i] < a[j]:
            cnt += 1
print(cnt)
</code>
<planning>1. sort 2. count pairs with a[i] < a[j]</planning>
</problem>
<algorithm>Brute force over pairs, O(n^2).</algorithm>
</root>""", {"n_examples": 1, "k": 1, "code0_contains": "if a[i] < a[j]:"}),

    ("retriever_plain_prose", "retriever", "he", """Here are three similar problems:

1. Two Sum: given an array and a target, find two numbers that add up to the target. We can use a hash map.
2. Maximum subarray: find the contiguous subarray with the largest sum (Kadane's algorithm).
3. Running median.

The algorithm behind the original problem is a simple linear scan with a running sum.""", None),

    ("retriever_empty", "retriever", "he", "", None),

    ("retriever_algorithm_only", "retriever", "he", """<root>
<algorithm>Greedy. Keep a running balance and stop at the first negative value.</algorithm>
</root>""", None),

    ("retriever_numbered_problem_tags", "retriever", "io", """<root>
<problem1>
<description>Print the sum of two integers a and b.</description>
<code>print(sum(map(int, input().split())))</code>
<planning>Read, add, print.</planning>
</problem1>
<problem2>
<description>Print the product of n integers.</description>
<code>
import math
input()
print(math.prod(map(int, input().split())))
</code>
<planning>Read n, read the numbers, multiply.</planning>
</problem2>
<algorithm>Implementation / simulation.</algorithm>
</root>""", {"n_examples": 2, "code1_contains": "math.prod"}),

    ("retriever_no_problem_wrappers", "retriever", "he", """<root>
<description>Check if any element of a list is negative.</description>
<code>def any_neg(xs): return any(x < 0 for x in xs)</code>
<planning>Use any() over the list.</planning>
<description>Compute prefix sums of a list.</description>
<code>from itertools import accumulate
def prefix(xs): return list(accumulate(xs))</code>
<planning>Use itertools.accumulate.</planning>
<algorithm>Prefix sums.</algorithm>
</root>""", {"n_examples": 2, "repairs": True, "code1_contains": "accumulate"}),

    ("retriever_degenerate_repetition", "retriever", "he", """<root>
<problem>
<problem>
<problem>
<problem>
<problem>
<problem>
<problem>""", None),

    ("retriever_escaped_entities", "retriever", "io", """<root>
<problem>
<description>Count numbers x with 1 &lt;= x &lt; n.</description>
<code>
n = int(input())
print(len([x for x in range(1, n) if x &lt; n]))
</code>
<planning>Loop from 1 to n-1 &amp; count.</planning>
</problem>
<algorithm>Math.</algorithm>
</root>""", {"n_examples": 1, "k": 1, "code0_contains": "if x < n", "description0_contains": "1 <= x < n"}),

    # Real SmolLM2-135M-Instruct answers (greedy, this repo's prompts, HumanEval/0 and /1), shortened.
    ("retriever_smollm2_prose_about_algorithm", "retriever", "he", """The algorithm that solves the problem is a recursive algorithm that uses a binary search to find the closest elements to a given threshold. The algorithm is named after the recursive algorithm that solves the Fibonacci sequence.

The algorithm is implemented using a recursive function that takes a list of numbers and a threshold as input.""",
     None),

    ("retriever_smollm2_repetition_loop", "retriever", "he", """The algorithm is a recursive function that takes a nested list of parentheses as input and returns a list of the same nested list of parentheses.

The steps to solve it are:

1. 1. 2. 3.

The algorithm is a recursive function that takes a nested list of parentheses as input and returns a list of the same nested list of parentheses.

The steps to solve it are:

1. 1. 2. 3.""", None),

    ("confidence_smollm2_no_number", "confidence", "he", """The plan is correct. The code is correct. The plan is correct. The plan is correct. The plan is correct. The plan is correct. The plan is correct.""", None),

    ("code_smollm2_cut_in_test_print", "coder", "he", """```python
def below_zero(operations: List[int]) -> bool:
    \"\"\"
    This function checks the running balance.
    \"\"\"
    return any(sum(operations[:i + 1]) < 0 for i in range(len(operations)))

# Test cases
print(below_zero([1, 2, -4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1""",
     {"defines": True, "compiles": True, "contains": "from typing import List", "not_contains": "print(",
      "repairs": True}),

    # ------------------------------------------------------------------ planner: the plan
    ("plan_clean", "plan", "he", """1. Initialise balance to 0.
2. For each operation add it to the balance.
3. If the balance is below zero return True.
4. After the loop return False.""", {"contains": "Initialise balance"}),

    ("plan_with_header", "plan", "he", """## Planning:
1. Set balance = 0.
2. Iterate over operations, updating balance.
3. Return True as soon as balance < 0, otherwise False.""", {"contains": "Set balance", "not_contains": "Planning:"}),

    ("plan_in_xml", "plan", "he", """<root>
<planning>
1. Running sum over the operations.
2. Return True at the first negative value.
</planning>
</root>""", {"contains": "Running sum", "not_contains": "<planning>"}),

    ("plan_empty", "plan", "he", "   \n\n  ", None),

    ("plan_only_eos", "plan", "he", "<|im_end|>", None),

    # ------------------------------------------------------------------ planner: the confidence
    ("confidence_clean", "confidence", "he", """<root>
<explanation>The plan simulates the balance and returns at the first negative value, which is exactly what
the problem asks.</explanation>
<confidence>95</confidence>
</root>""", {"score": 95, "repairs": False}),

    ("confidence_prose_around", "confidence", "he", """Let me check the plan.

<root>
<explanation> The plan is correct. </explanation>
<confidence> 90 </confidence>
</root>

The plan should work for all test cases.""", {"score": 90}),

    ("confidence_unclosed", "confidence", "he", """<root>
<explanation>The plan handles the empty list and negative prefixes.</explanation>
<confidence>75""", {"score": 75, "repairs": True}),

    ("confidence_no_tags", "confidence", "he", """The plan is mostly correct but may miss the empty list.
Confidence: 60%""", {"score": 60, "repairs": True}),

    ("confidence_fraction", "confidence", "he", """<root>
<explanation>Looks right.</explanation>
<confidence>0.8</confidence>
</root>""", {"score": 80, "repairs": True}),

    ("confidence_word", "confidence", "he", """<root>
<explanation>The plan is good.</explanation>
<confidence>High</confidence>
</root>""", None),

    ("confidence_missing", "confidence", "he", "The plan is correct and solves the problem efficiently.", None),

    ("confidence_fenced_out_of_100", "confidence", "he", """```xml
<root>
<explanation>Correct.</explanation>
<confidence>100/100</confidence>
</root>
```""", {"score": 100}),

    ("confidence_percent_in_tag", "confidence", "he", "<root><explanation>ok</explanation><confidence>85%</confidence></root>",
     {"score": 85}),

    ("confidence_over_100", "confidence", "he", "<confidence>150</confidence>", {"score": 100, "repairs": True}),

    # ------------------------------------------------------------------ coder
    ("code_clean_function", "coder", "he", f"```python\nfrom typing import List\n\n\n{GOOD_FN}\n```",
     {"defines": True, "compiles": True, "repairs": False}),

    ("code_solution_then_usage", "coder", "he", f"""Here is the solution:

```python
from typing import List

{GOOD_FN}
```

Example usage:

```python
print(below_zero([1, 2, -4, 5]))  # True
```""", {"defines": True, "compiles": True, "not_contains": "print(below_zero"}),

    ("code_no_fence", "coder", "he", f"from typing import List\n\n{GOOD_FN}\n",
     {"defines": True, "compiles": True, "repairs": True}),

    ("code_body_only_fenced", "coder", "he", f"```python\n{GOOD_BODY}\n```",
     {"defines": True, "compiles": True, "contains": "from typing import List", "repairs": True}),

    ("code_body_continuation_unfenced", "coder", "he",
     "balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n"
     "            return True\n    return False\n", {"defines": True, "compiles": True}),

    ("code_truncated_unclosed_fence", "coder", "he", """```python
from typing import List

def below_zero(operations: List[int]) -> bool:
    balance = 0
    for op in operations:
        balance += op
        if bal""", {"defines": True, "compiles": False, "repairs": True}),

    ("code_truncated_after_a_complete_def", "coder", "he", """```python
from typing import List

def below_zero(operations: List[int]) -> bool:
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False

def below_zero_with_history(operations: List[int]) -> bool:
    \"\"\"
    You're given a list of deposit and withdrawal operations on a bank account that starts with zero
    balance. Your task is to detect if at any point the balance of account fallls below zero, and""",
     {"defines": True, "compiles": True, "contains": "balance += op", "not_contains": "with_history",
      "repairs": True}),

    ("code_stdio_with_io_blocks", "coder", "io", """```python
n = int(input())
a = list(map(int, input().split()))
print(sum(a))
```

Input:
```
3
1 2 3
```
Output:
```
6
```""", {"compiles": True, "contains": "print(sum(a))", "not_contains": "1 2 3"}),

    ("code_draft_then_final", "coder", "he", """First attempt:

```python
def below_zero(operations):
    return sum(operations) < 0
```

Wait, this only checks the final balance. The correct version checks every prefix:

```python
def below_zero(operations):
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False
```""", {"defines": True, "compiles": True, "contains": "balance += op"}),

    ("code_py_label", "coder", "io", "```py\nimport sys\ndata = sys.stdin.read().split()\nprint(sum(map(int, data[1:])))\n```",
     {"compiles": True, "contains": "sys.stdin"}),

    ("code_prose_only", "coder", "he", """To solve this problem we iterate over the operations while keeping a running
balance. As soon as the balance becomes negative we return True; if we reach the end we return False.""", None),

    ("code_wrong_language", "coder", "io", """```cpp
#include <iostream>
int main() { long long n, s = 0, x; std::cin >> n; while (n--) { std::cin >> x; s += x; } std::cout << s; }
```""", None),

    ("code_in_code_tags", "coder", "io", """<code>
n = int(input())
print(sum(map(int, input().split())))
</code>""", {"compiles": True, "contains": "print(sum(map(int"}),

    ("code_fence_glued_to_last_line", "coder", "he", f"```python\nfrom typing import List\n{GOOD_FN}```\n\nDone.",
     {"defines": True, "compiles": True}),

    ("code_special_tokens", "coder", "he", f"```python\nfrom typing import List\n{GOOD_FN}\n```<|im_end|>",
     {"defines": True, "compiles": True, "not_contains": "im_end"}),

    ("code_after_think", "coder", "io", """<think>
We need to read n and the numbers. Something like ```python print(1)``` would be wrong.
</think>
```python
n = int(input())
print(sum(map(int, input().split())))
```""", {"compiles": True, "contains": "print(sum(map", "not_contains": "print(1)"}),

    ("code_prose_then_unfenced_code", "coder", "io", """Sure, here is the code:

n = int(input())
nums = list(map(int, input().split()))
print(sum(nums))

This reads the input and prints the sum.""", {"compiles": True, "contains": "print(sum(nums))",
                                               "not_contains": "This reads"}),

    ("code_missing_imports", "coder", "he", f"```python\n{GOOD_FN}\n```",
     {"defines": True, "compiles": True, "contains": "from typing import List", "repairs": False}),

    # ------------------------------------------------------------------ debugger
    ("debug_plan_then_code", "debugger", "he", f"""## Modified Planning:
1. The old code only checked the final sum; check the balance after every operation.
2. Return True at the first negative balance.

```python
from typing import List

{GOOD_FN}
```""", {"defines": True, "compiles": True, "plan_contains": "after every operation",
         "plan_not_contains": "Modified Planning"}),

    ("debug_code_only", "debugger", "io", "```python\nn=int(input())\nprint(sum(map(int,input().split())))\n```",
     {"compiles": True, "plan_equals": ""}),

    ("debug_no_code", "debugger", "he", """The test below_zero([1, 2, -4, 5]) expected True but got False. The
problem is that the function checks only the total. We need to check the running balance instead.""", None),

    ("debug_old_and_new_code", "debugger", "he", """The previous code was:

```python
def below_zero(operations):
    return sum(operations) < 0
```

It fails because it ignores intermediate balances. Corrected code:

```python
def below_zero(operations):
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False
```""", {"defines": True, "compiles": True, "contains": "balance += op", "not_contains": "sum(operations)"}),
]
