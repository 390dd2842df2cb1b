"""MkDocs hooks for the book (book/mkdocs.yml names this file): two small changes to the rendered pages.

1. Notebook pages load MathJax from the site only. mkdocs-jupyter's template writes nbconvert's MathJax
   loader, which fetches MathJax 2 from a CDN, into every notebook page; the site already loads its own
   MathJax 3 on every page (book/theme/assets/mathjax-config.js), so that loader is cut out.
2. Each chapter page and each notebook page gets a bar of links under its title: the chapter, its
   notebook, its exercise (stub and tests), the .ipynb file, and the notebook opened in Colab or Binder.
   scripts/book.py decides which pages belong together (`extra.link_bars`); Colab and Binder only work
   from the public repository, whose address it reads from pyproject.toml into `extra.repository`.
"""

import html
import posixpath
import re
from urllib.parse import quote

NBCONVERT_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)


def launch_links(repository, notebook):
    """The Colab and Binder addresses that open `notebook` (a repository path) from the repository's main."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repository)
    if not match:
        return {}  # both services open notebooks from GitHub only
    owner, name = match.groups()
    return {"Open in Colab": f"https://colab.research.google.com/github/{owner}/{name}/blob/main/{notebook}",
            "Open in Binder": f"https://mybinder.org/v2/gh/{owner}/{name}/HEAD?labpath={quote(notebook, safe='')}"}


def on_page_content(content, page, config, files):
    src_uri = page.file.src_uri
    if src_uri.endswith(".ipynb"):
        content = NBCONVERT_MATHJAX.sub("", content)
    bar = config.extra["link_bars"].get(src_uri)
    if not bar:
        return content
    links = {label: files.get_file_from_path(target).url_relative_to(page.file) for label, target in bar.items()}
    notebook = src_uri if src_uri.endswith(".ipynb") else bar.get("Notebook")
    if notebook == src_uri:
        links["Download .ipynb"] = posixpath.basename(notebook)  # scripts/book.py puts the file beside the page
    if notebook:
        links.update(launch_links(config.extra["repository"], notebook))
    buttons = "".join(f'<a class="md-button" href="{html.escape(url)}">{html.escape(label)}</a>'
                      for label, url in links.items())
    bar_html = f'<div class="book-links">{buttons}</div>'
    heading_end = content.find("</h1>")
    if heading_end < 0:
        return bar_html + content
    return content[:heading_end + 5] + bar_html + content[heading_end + 5:]
