"""What the text tower is given for a query: the query cleaned, put into a prompt template."""

from __future__ import annotations

import re
import unicodedata

DEFAULT_TEMPLATE = "a photo of {}"
MAX_QUERY_CHARS = 200  # as the word search; a longer query gets a 422
MAX_TEMPLATE_CHARS = 200
SPACES = re.compile(r"\s+")


def clean_text(text: str | None) -> str:
    """`text` with control and format characters (NUL, CR/LF, bidi overrides, ...) as spaces and runs of
    white space as one space, trimmed."""
    kept = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text or "")
    return SPACES.sub(" ", kept).strip()


def check_template(template: str) -> str:
    """A prompt template, cleaned: it must hold exactly one `{}` (where the query goes); other braces are
    literal text."""
    cleaned = clean_text(template)
    if cleaned.count("{}") != 1:
        raise ValueError("a template must contain exactly one {} where the query goes, e.g. 'a photo of {}'")
    return cleaned


def prompt(q: str, template: str) -> str:
    """The text the tower embeds: the template with its `{}` replaced by the query."""
    return template.replace("{}", q)
