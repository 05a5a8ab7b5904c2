"""`--where` filters: parsed against the table's schema and rebuilt, never passed through as text.

The language: comparisons `column OP literal` (OP one of = != <> < <= > >=), `column IN (literal, ...)`,
`column IS [NOT] NULL`, `column LIKE 'pattern'`, joined with AND / OR / NOT and parentheses.
Columns must be metadata columns of the table; literals are 'quoted strings' (a quote doubled
inside), numbers, TRUE or FALSE. Anything else (another statement, a comment, a function call, an
unknown column) is rejected with a message saying what and where.
"""

from __future__ import annotations

import re

from embedstore.errors import UsageError

TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    | (?P<op><=|>=|<>|!=|=|<|>)
    | (?P<paren>[(),])
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<other>\S)
    )""", re.VERBOSE)
KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"}
NOT_FILTERABLE = {"cls", "patch_mean"}  # vectors


def validated_where(expression: str, columns: list[str]) -> str:
    """The filter rebuilt from its parsed form, for a table with these columns; UsageError if it
    is not in the language above."""
    tokens = _tokenize(expression)
    parser = _Parser(tokens, [c for c in columns if c not in NOT_FILTERABLE], expression)
    sql = parser.expression()
    if parser.position != len(tokens):
        parser.fail("unexpected text")
    return sql


def _tokenize(expression: str) -> list[tuple[str, str, int]]:
    tokens, position = [], 0
    while position < len(expression):
        match = TOKEN.match(expression, position)
        if not match or match.end() == position:
            break
        kind = match.lastgroup
        text = match.group(kind)
        if kind == "other":
            raise UsageError(f"--where: {text!r} is not allowed (at character {match.start(kind) + 1})")
        tokens.append((kind, text, match.start(kind)))
        position = match.end()
    if not tokens:
        raise UsageError("--where is empty")
    return tokens


class _Parser:
    def __init__(self, tokens, columns: list[str], expression: str):
        self.tokens, self.columns, self.text = tokens, columns, expression
        self.position = 0

    def fail(self, what: str):
        at = self.tokens[self.position][2] + 1 if self.position < len(self.tokens) else len(self.text)
        raise UsageError(f"--where: {what} at character {at} of {self.text!r}")

    def peek(self) -> tuple[str, str] | None:
        if self.position >= len(self.tokens):
            return None
        kind, text, _ = self.tokens[self.position]
        return kind, (text.upper() if kind == "word" and text.upper() in KEYWORDS else text)

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token[1] != expected):
            self.fail(f"expected {expected or 'more'}")
        self.position += 1
        return token[1]

    def expression(self) -> str:
        return self.joined("OR", self.conjunction)

    def conjunction(self) -> str:
        return self.joined("AND", self.unary)

    def joined(self, operator: str, operand) -> str:
        """operand (operator operand)*: OR binds looser than AND, which binds looser than NOT."""
        parts = [operand()]
        while self.peek() == ("word", operator):
            self.take()
            parts.append(operand())
        return f" {operator} ".join(parts)

    def unary(self) -> str:
        if self.peek() == ("word", "NOT"):
            self.take()
            return f"NOT {self.unary()}"
        if self.peek() == ("paren", "("):
            self.take()
            inner = self.expression()
            self.take(")")
            return f"({inner})"
        return self.comparison()

    def comparison(self) -> str:
        token = self.peek()
        if token is None or token[0] != "word" or token[1] in KEYWORDS:
            self.fail("expected a column name")
        column = self.take()
        if column not in self.columns:
            self.position -= 1
            self.fail(f"unknown column {column!r} (filterable: {', '.join(self.columns)})")
        token = self.peek()
        if token == ("word", "IS"):
            self.take()
            negated = self.peek() == ("word", "NOT")
            if negated:
                self.take()
            self.take("NULL")
            return f"{column} IS {'NOT ' if negated else ''}NULL"
        if token == ("word", "IN"):
            self.take()
            self.take("(")
            values = [self.literal()]
            while self.peek() == ("paren", ","):
                self.take()
                values.append(self.literal())
            self.take(")")
            return f"{column} IN ({', '.join(values)})"
        if token == ("word", "LIKE"):
            self.take()
            return f"{column} LIKE {self.literal(strings_only=True)}"
        if token is None or token[0] != "op":
            self.fail("expected a comparison (= != < <= > >= IN IS LIKE)")
        operator = self.take()
        return f"{column} {'!=' if operator == '<>' else operator} {self.literal()}"

    def literal(self, strings_only: bool = False) -> str:
        token = self.peek()
        if token is not None and token[0] == "string":
            return self.take()
        if not strings_only and token is not None and (token[0] == "number" or token[1] in ("TRUE", "FALSE")):
            return self.take()
        self.fail("expected a literal ('text', a number, TRUE or FALSE)")
