"""A small document model rendered to Markdown and to a standalone HTML page (run reports)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from skindistil.files import write_text
from skindistil.markdown import markdown_table


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: str  # relative to the document's folder
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Table, Figure

    def text(self, paragraph: str) -> Section:
        self.blocks.append(paragraph)
        return self

    def table(self, header: list[str], rows: list[list]) -> Section:
        self.blocks.append(Table([str(h) for h in header], [[str(c) for c in row] for row in rows]))
        return self

    def figure(self, path: str, caption: str) -> Section:
        self.blocks.append(Figure(path, caption))
        return self


@dataclass
class Document:
    title: str
    sections: list[Section] = field(default_factory=list)
    preface: list[str] = field(default_factory=list)

    def section(self, title: str) -> Section:
        self.sections.append(Section(title))
        return self.sections[-1]

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *[p + "\n" for p in self.preface]]
        for section in self.sections:
            out += [f"## {section.title}", ""]
            for block in section.blocks:
                if isinstance(block, Table):
                    out.append(markdown_table(block.header, block.rows))
                elif isinstance(block, Figure):
                    out.append(f"![{block.caption}]({block.path})")
                    out.append(f"*{block.caption}*")
                else:
                    out.append(block)
                out.append("")
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>", *[f"<p class='preface'>{esc(p)}</p>" for p in self.preface]]
        for section in self.sections:
            body.append(f"<section><h2>{esc(section.title)}</h2>")
            for block in section.blocks:
                if isinstance(block, Table):
                    head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
                    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                    body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
                elif isinstance(block, Figure):
                    body.append(f"<figure><img src='{esc(block.path)}' alt='{esc(block.caption)}'>"
                                f"<figcaption>{esc(block.caption)}</figcaption></figure>")
                else:
                    body.append(f"<p>{esc(block)}</p>")
            body.append("</section>")
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body><main>"
            + "\n".join(body) + "</main></body></html>"
        )

    def write(self, folder: str | Path, stem: str = "report") -> tuple[Path, Path]:
        folder = Path(folder)
        md, page = folder / f"{stem}.md", folder / f"{stem}.html"
        write_text(md, self.markdown())
        write_text(page, self.html())
        return md, page


_CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
main{max-width:1100px;margin:auto;padding:1.5rem}
h1{border-bottom:2px solid #444}h2{margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}
thead{background:#eee}
figure{display:inline-block;margin:.5rem;vertical-align:top}
figure img{max-width:520px;border:1px solid #ddd}
figcaption{font-size:.85rem;color:#555}
.preface{background:#fff3cd;border:1px solid #e0c060;padding:.5rem}
"""
