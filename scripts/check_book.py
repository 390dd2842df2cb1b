"""Build the book, then read every page of it in a real browser with the network off (what `make book-check` runs).

    python scripts/check_book.py [--no-build]

Each page of site/ is opened in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no
browser is downloaded), served by a file server on 127.0.0.1. Every request to any other address is blocked
and counted, so a page that needs the network fails here as it would on a train. The check fails on:

    - a warning of the build (MkDocs checks the links between Markdown pages);
    - a console error or an uncaught exception;
    - a request that left the machine, failed, or got an error status (a missing script, font or image);
    - a broken internal link: a page, file or #anchor that is not there;
    - an image that did not load;
    - unrendered math: raw $...$, $$, \\( or \\[ left in the text (code aside), or a MathJax error;
    - a notebook page that shows fewer plots than its notebook holds, or has no Colab or Binder link;
    - a chapter or notebook with no page;
    - a search for a word the book uses that finds nothing.

It saves screenshots of the home page, a chapter (at its first display formula, and at its first figure)
and a notebook (at its first plot) to runs/book/, for a person to look at.
"""

import argparse
import functools
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urldefrag

sys.path.insert(0, str(Path(__file__).resolve().parent))

import book  # noqa: E402  (scripts/book.py)

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox (Playwright adds it); the rest stop it from calling home at start-up,
# and the resolver rule makes every host name but the local server's unknown: the network is off.
FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
SHOTS = book.ROOT / "runs" / "book"
SEARCH_WORD = "absmax"  # used by chapters 3 and 4; the search box must find it offline

# Runs in the page once it has loaded and MathJax has typeset it; returns what the checks need.
READ_PAGE = r"""async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  const images = [...document.images];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const skip = "SCRIPT,STYLE,PRE,CODE,TEXTAREA,NOSCRIPT,MJX-CONTAINER,SVG".split(",");
  const rawMath = [];
  const pattern = /\\\(|\\\[|\$\$|\$[^\s$][^$]*\$/;
  for (const block of document.querySelectorAll("article p, article li, article td, article th, article h1, "
                                                + "article h2, article h3, article h4, article dd, article dt")) {
    let text = "";
    const walk = node => {
      if (node.nodeType === Node.TEXT_NODE) { text += node.textContent; return; }
      if (node.nodeType !== Node.ELEMENT_NODE || skip.includes(node.tagName.toUpperCase())) return;
      node.childNodes.forEach(walk);
    };
    walk(block);
    const match = text.match(pattern);
    if (match) rawMath.push(text.slice(Math.max(0, match.index - 30), match.index + 50).replace(/\s+/g, " "));
  }
  return {
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    ids: [...document.querySelectorAll("[id], a[name]")].map(e => e.id || e.getAttribute("name")),
    brokenImages: images.filter(img => !(img.complete && img.naturalWidth > 0))
                        .map(img => img.getAttribute("src").slice(0, 80)),
    rawMath: [...new Set(rawMath)],
    mathErrors: [...document.querySelectorAll("mjx-merror, [data-mjx-error]")]
                  .map(e => e.getAttribute("data-mjx-error") || e.textContent).slice(0, 5),
    formulas: document.querySelectorAll("mjx-container").length,
    plots: [...document.querySelectorAll(".jp-RenderedImage img, .jp-RenderedSVG svg")]
             .filter(e => e.tagName.toUpperCase() !== "IMG" || e.naturalWidth > 0).length,
  };
}"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the browser hung up on a response when the check moved on to the next page: not a problem


def serve(folder):
    """A file server for folder on 127.0.0.1 (a free port), in a thread; returns (server, base URL)."""
    server = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def plots_in(notebook):
    """How many plots (image outputs) a notebook file holds."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    return sum(1 for cell in cells if cell["cell_type"] == "code" for output in cell.get("outputs", [])
               if any(kind.startswith("image/") for kind in output.get("data", {})))


def expected_pages(root=book.ROOT, site=book.SITE):
    """Problems for chapters, notebooks, the exercises and the glossary that have no page in the site."""
    wanted = ["index.html", "exercises/index.html", "chapters/glossary.html"]
    for chapter, notebook in book.chapters(root):
        wanted += [chapter[:-3] + ".html"] + ([notebook[:-6] + ".html"] if notebook else [])
    wanted += [f"notebooks/{path.stem}.html" for path in sorted((root / "notebooks").glob("*.ipynb"))]
    return [f"{path}: no such page in the site" for path in dict.fromkeys(wanted) if not (site / path).exists()]


class Browser:
    """One Chromium page that records every console error, failed request and blocked request."""

    def __init__(self, playwright, base, search_index):
        self.base, self.events = base, []
        # Material rebuilds the whole search index in the browser on every page it opens, which is most of
        # the check's time; the search test below gets the real index, every other page an empty one.
        self.search_index, self.empty_index = search_index, {"config": search_index["config"], "docs": []}
        self.real_search = False
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        self.context = self.browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        self.context.route("**/*", self.only_local)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.events.append(f"console error: {m.text}"))
        self.page.on("pageerror", lambda error: self.events.append(f"uncaught exception: {error}"))
        self.page.on("requestfailed", self.failed)
        self.page.on("response", lambda r: r.status >= 400 and self.events.append(f"HTTP {r.status}: {r.url}"))

    def failed(self, request):
        if request.failure != "net::ERR_ABORTED":  # aborted: the check moved on to the next page (a favicon)
            self.events.append(f"request failed: {request.url[:100]} ({request.failure})")

    def only_local(self, route):
        if route.request.url == self.base + "search/search_index.json":
            route.fulfill(json=self.search_index if self.real_search else self.empty_index)
        elif route.request.url.startswith(self.base):
            route.continue_()
        else:
            self.events.append(f"blocked a request to the network: {route.request.url[:100]}")
            route.abort("internetdisconnected")

    def read(self, url):
        """Open url; return (what READ_PAGE found, the problems the browser saw meanwhile)."""
        self.events = []
        self.page.goto(url, wait_until="load")
        found = self.page.evaluate(READ_PAGE)
        return found, list(dict.fromkeys(self.events))

    def screenshot(self, url, path, selector=None):
        """A 1280 × 900 screenshot of url, scrolled so that the first selector match is in the middle."""
        self.page.goto(url, wait_until="load")
        self.page.evaluate(READ_PAGE)
        if selector and self.page.locator(selector).count():
            self.page.locator(selector).first.evaluate("e => e.scrollIntoView({block: 'center'})")
            self.page.wait_for_timeout(600)  # the header swaps the site name for the page title in an animation
        self.page.screenshot(path=str(path))
        return path

    def search_finds(self, url, word):
        self.real_search = True
        self.page.goto(url, wait_until="load")
        self.page.locator("input.md-search__input").fill(word)
        try:
            self.page.locator(".md-search-result__item").first.wait_for(timeout=10_000)
        except Exception:  # Playwright's TimeoutError
            return False
        return True

    def close(self):
        self.browser.close()


def check_links(pages, base):
    """Problems for internal links whose page, file or #anchor is not there (each target checked once)."""
    problems, status = [], {}
    for url, found in pages.items():
        source = url[len(base):]
        for link in found["links"]:
            if not link.startswith(base):
                continue  # another site: not followed (the network is off)
            target, fragment = urldefrag(link)
            if target not in pages and target not in status:
                try:
                    with urllib.request.urlopen(target) as response:
                        status[target] = response.status
                except urllib.error.HTTPError as error:
                    status[target] = error.code
            if target not in pages and status[target] != 200:
                problems.append(f"{source}: broken link to {target[len(base):]} (HTTP {status[target]})")
            elif fragment and target in pages and unquote(fragment) not in pages[target]["ids"]:
                problems.append(f"{source}: broken link to {target[len(base):]}#{fragment} (no such anchor)")
    return list(dict.fromkeys(problems))


def check_page(name, found, events):
    """Problems one page showed in the browser."""
    problems = [f"{name}: {event}" for event in events]
    problems += [f"{name}: image did not load: {src}" for src in found["brokenImages"]]
    problems += [f"{name}: unrendered math: ...{text}..." for text in found["rawMath"]]
    problems += [f"{name}: MathJax error: {error}" for error in found["mathErrors"]]
    if name.startswith("notebooks/") and (book.SITE / name).with_suffix(".ipynb").exists():
        wanted = plots_in((book.SITE / name).with_suffix(".ipynb"))
        if found["plots"] < wanted:
            problems.append(f"{name}: shows {found['plots']} of the notebook's {wanted} plots")
        for service in ("https://colab.research.google.com/github/", "https://mybinder.org/v2/gh/"):
            if book.repository_url().startswith("https://github.com/") and not any(
                    link.startswith(service) for link in found["links"]):
                problems.append(f"{name}: no link to {service}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-build", action="store_true", help="check site/ as it is")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    warnings = [] if args.no_build else book.build()[1]
    built = time.perf_counter()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make book-check does it)")
    server, base = serve(book.SITE)
    names = sorted(str(path.relative_to(book.SITE)) for path in book.SITE.rglob("*.html"))
    problems, pages = [f"mkdocs: {warning}" for warning in warnings] + expected_pages(), {}
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        index = json.loads((book.SITE / "search" / "search_index.json").read_text(encoding="utf-8"))
        browser = Browser(playwright, base, index)
        for name in names:
            found, events = browser.read(base + name)
            pages[base + name] = found
            problems += check_page(name, found, events)
        problems += check_links(pages, base)
        if not browser.search_finds(base + "index.html", SEARCH_WORD):
            problems.append(f"search: no result for {SEARCH_WORD!r}")
        chapter = next((n for n in names if n.startswith("chapters/0")), "index.html")
        notebook = next((n for n in names if n.startswith("notebooks/") and pages[base + n]["plots"]), chapter)
        shots = [browser.screenshot(base + "index.html", SHOTS / "home.png"),
                 browser.screenshot(base + chapter, SHOTS / "chapter.png", "mjx-container[display='true']"),
                 browser.screenshot(base + notebook, SHOTS / "notebook.png", ".jp-RenderedImage")]
        figure = next((n for n in names if n.startswith("chapters/0")
                       and "figures/" in (book.SITE / n).read_text(encoding="utf-8")), None)
        if figure:
            shots.append(browser.screenshot(base + figure, SHOTS / "chapter-figure.png", "article img"))
        browser.close()
    server.shutdown()

    for problem in problems:
        print("FAIL", problem)
    formulas = sum(found["formulas"] for found in pages.values())
    plots = sum(found["plots"] for found in pages.values())
    links = sum(len(found["links"]) for found in pages.values())
    print(f"book-check: {len(pages)} pages, {links} links, {formulas} formulas, {plots} notebook plots; "
          f"build {built - start:.0f} s, browser {time.perf_counter() - built:.0f} s; "
          f"screenshots: {', '.join(str(shot.relative_to(book.ROOT)) for shot in shots)}")
    print(f"book-check: {len(problems)} problems" if problems else "book-check: all pages pass")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
