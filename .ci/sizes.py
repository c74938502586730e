#!/usr/bin/env python3
"""Sizes: no file in src/ over 600 lines outside its test modules, no function over 100 lines.

A test module is a `#[cfg(test)]` `mod x { ... }` block (`mod tests`, fixtures and the like); its lines do not count
towards its file's size, and its functions are not measured. A function's size runs from the line of its `fn` to the
line of its closing brace. Braces are matched on the source with comments, strings and character literals blanked
out, so a `'{'` or a `"}"` cannot end a block early.

Prints every file and function over its limit, then the largest of each; exits 1 if anything is over.
"""

import pathlib
import re
import sys

MAX_FILE_LINES = 600
MAX_FN_LINES = 100

TEST_MODULE = re.compile(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{")
FN = re.compile(r"\bfn\s+(\w+)")
RAW_STRING = re.compile(r'b?r(#*)"')


def blank_out(text):
    """The source with every comment, string and character literal replaced by spaces, newlines kept."""
    out = list(text)
    i, n = 0, len(text)

    def blank(start, end):
        for k in range(start, end):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "br" and (raw := RAW_STRING.match(text, i)) and not is_identifier_tail(text, i):
            close = '"' + raw.group(1)
            end = text.find(close, raw.end())
            end = n if end < 0 else end + len(close)
            blank(i, end)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif c == "'":
            # A character literal ('x', '\n', '\u{7f}'), or else a lifetime ('a), which is left alone.
            if text.startswith("\\", i + 1):
                end = text.find("'", i + 3)
                blank(i, end + 1)
                i = end + 1
            elif i + 2 < n and text[i + 2] == "'":
                blank(i, i + 3)
                i += 3
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def is_identifier_tail(text, i):
    """Whether `text[i]` continues an identifier (the `r` of `for`), rather than starting a literal."""
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")


def closing_brace(code, open_at):
    """Where the brace opened at `open_at` closes."""
    depth = 0
    for k in range(open_at, len(code)):
        if code[k] == "{":
            depth += 1
        elif code[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    raise ValueError(f"unbalanced brace at offset {open_at}")


def body_start(code, after):
    """The `{` that opens the body of the function whose name ends at `after`; None for a declaration (`;`)."""
    depth = 0
    for k in range(after, len(code)):
        c = code[k]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif depth == 0 and c == "{":
            return k
        elif depth == 0 and c == ";":
            return None
    return None


def measure(path):
    """(lines outside test modules, [(line, name, lines) for each function outside them])."""
    code = blank_out(path.read_text())
    line_of = lambda offset: code.count("\n", 0, offset) + 1
    tests = []
    for match in TEST_MODULE.finditer(code):
        close = closing_brace(code, match.end() - 1)
        tests.append((match.start(), close))
    in_tests = lambda offset: any(start <= offset <= end for start, end in tests)
    test_lines = sum(line_of(end) - line_of(start) + 1 for start, end in tests)
    file_lines = code.count("\n") + (0 if code.endswith("\n") else 1) - test_lines
    functions = []
    for match in FN.finditer(code):
        if in_tests(match.start()):
            continue
        body = body_start(code, match.end())
        if body is None:
            continue
        lines = line_of(closing_brace(code, body)) - line_of(match.start()) + 1
        functions.append((line_of(match.start()), match.group(1), lines))
    return file_lines, functions


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    files, functions, over = [], [], []
    for path in sorted((root / "src").rglob("*.rs")):
        name = path.relative_to(root)
        file_lines, fns = measure(path)
        files.append((file_lines, f"{name}"))
        functions.extend((lines, f"{name}:{line} fn {fn}") for line, fn, lines in fns)
        if file_lines > MAX_FILE_LINES:
            over.append(f"{name}: {file_lines} lines outside its test modules (at most {MAX_FILE_LINES})")
        over.extend(
            f"{name}:{line}: fn {fn} is {lines} lines (at most {MAX_FN_LINES})"
            for line, fn, lines in fns
            if lines > MAX_FN_LINES
        )
    for problem in over:
        print(problem)
    largest, longest = max(files), max(functions)
    print(f"sizes: {len(files)} files, {len(functions)} functions measured")
    print(f"  largest file:     {largest[1]}, {largest[0]} lines outside its test modules (limit {MAX_FILE_LINES})")
    print(f"  longest function: {longest[1]}, {longest[0]} lines (limit {MAX_FN_LINES})")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
