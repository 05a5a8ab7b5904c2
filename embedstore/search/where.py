"""`--where` filters: parsed against the table's schema and rebuilt, never passed through as text.

The language: comparisons `column OP literal` (OP one of = != <> < <= > >=), `column IN (literal, ...)`,
`column IS [NOT] NULL`, `column LIKE 'pattern'`, joined with AND / OR / NOT and parentheses.
Columns must be metadata columns of the table; literals are 'quoted strings' (a quote doubled
inside), numbers (negative ones too: `slice_position < -10.5`), TRUE or FALSE, of the column's type
and within its range. Anything else (another statement, a comment, a function call, an unknown
column, a literal LanceDB could not convert, nesting deeper than MAX_DEPTH) is rejected with a
message saying what and where.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

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
WHOLE_NUMBER = re.compile(r"-?\d+")
# NOTs and parentheses one inside another: LanceDB's SQL parser gives up near 48 levels, Python's
# stack (this parser recurses) near a thousand.
MAX_DEPTH = 32
QUOTED_MAX = 120  # characters of the filter an error message quotes


def validated_where(expression: str, columns: pa.Schema | list[str]) -> str:
    """The filter rebuilt from its parsed form, for a table of this schema (every literal checked
    against its column's type) or with these column names (types unchecked); UsageError if it is
    not in the language above."""
    tokens = _tokenize(expression)
    parser = _Parser(tokens, _filterable(columns), expression)
    sql = parser.expression()
    if parser.position != len(tokens):
        parser.fail("unexpected text")
    return sql


def _filterable(columns: pa.Schema | list[str]) -> dict[str, pa.DataType | None]:
    """Column name -> Arrow type (None when unknown) of every column a filter may name."""
    if isinstance(columns, pa.Schema):
        return {field.name: field.type for field in columns
                if not pa.types.is_list(field.type) and not pa.types.is_fixed_size_list(field.type)}
    return {name: None for name in columns if name not in NOT_FILTERABLE}


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
    def __init__(self, tokens, columns: dict[str, pa.DataType | None], expression: str):
        self.tokens, self.columns, self.text = tokens, columns, expression
        self.position = 0
        self.depth = 0

    def fail(self, what: str):
        at = self.tokens[self.position][2] + 1 if self.position < len(self.tokens) else len(self.text)
        quoted = self.text if len(self.text) <= QUOTED_MAX else self.text[:QUOTED_MAX - 3] + "..."
        raise UsageError(f"--where: {what} at character {at} of {quoted!r}")

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
            return f"NOT {self.nested(self.unary)}"
        if self.peek() == ("paren", "("):
            self.take()
            inner = self.nested(self.expression)
            self.take(")")
            return f"({inner})"
        return self.comparison()

    def nested(self, parse) -> str:
        """parse() one level deeper, refused past MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"NOT and parentheses nested deeper than {MAX_DEPTH} levels")
        parsed = parse()
        self.depth -= 1
        return parsed

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
            values = [self.literal(column)]
            while self.peek() == ("paren", ","):
                self.take()
                values.append(self.literal(column))
            self.take(")")
            return f"{column} IN ({', '.join(values)})"
        if token == ("word", "LIKE"):
            self.take()
            if self.columns[column] is not None and not _is_text(self.columns[column]):
                self.fail(f"LIKE matches text, and {column} is {self.columns[column]}")
            return f"{column} LIKE {self.literal(column, strings_only=True)}"
        if token is None or token[0] != "op":
            self.fail("expected a comparison (= != < <= > >= IN IS LIKE)")
        operator = self.take()
        return f"{column} {'!=' if operator == '<>' else operator} {self.literal(column)}"

    def literal(self, column: str, strings_only: bool = False) -> str:
        token = self.peek()
        allowed = token is not None and (token[0] == "string" or not strings_only and (
            token[0] == "number" or token[1] in ("TRUE", "FALSE")))
        if not allowed:
            self.fail("expected a literal ('text', a number, TRUE or FALSE)")
        expected = _expected_literal(self.columns[column], *token)
        if expected:
            self.fail(f"{column} is {self.columns[column]}: compare it with {expected}, not {token[1]}")
        return self.take()


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _expected_literal(data_type: pa.DataType | None, kind: str, text: str) -> str | None:
    """What a literal compared with a column of this type must be, when `text` is not that (None
    when it fits, or the type is unknown): LanceDB refuses a literal it cannot convert to the
    column's type, with a message naming Rust types."""
    if data_type is None:
        return None
    if _is_text(data_type):
        return None if kind == "string" else "a 'quoted string'"
    if pa.types.is_boolean(data_type):
        return None if text in ("TRUE", "FALSE") else "TRUE or FALSE"
    if pa.types.is_integer(data_type):
        bounds = np.iinfo(data_type.to_pandas_dtype())
        if kind != "number" or not WHOLE_NUMBER.fullmatch(text) or not bounds.min <= int(text) <= bounds.max:
            return f"a whole number from {bounds.min} to {bounds.max}"
    if pa.types.is_floating(data_type):
        largest = float(np.finfo(data_type.to_pandas_dtype()).max)
        if kind != "number" or not abs(float(text)) <= largest:
            return f"a number between {-largest:g} and {largest:g}"
    return None
