// MathJax 3, served by the site itself (assets/mathjax/tex-svg-full.js: SVG output, so no web fonts), and
// loaded only on pages that hold math: chapter pages, where pymdownx.arithmatex has wrapped each formula
// as \(...\) or \[...\] in an element of class "arithmatex", and notebook pages, where nbconvert leaves
// Jupyter's $...$ and $$...$$ in the markdown cells as they were written. Code (pre, code) is never typeset.
(function () {
  const notebookPage = document.querySelector(".jupyter-wrapper") !== null;
  if (!notebookPage && document.querySelector(".arithmatex") === null) return;
  window.MathJax = {
    tex: {
      inlineMath: notebookPage ? [["$", "$"], ["\\(", "\\)"]] : [["\\(", "\\)"]],
      displayMath: notebookPage ? [["$$", "$$"], ["\\[", "\\]"]] : [["\\[", "\\]"]],
      processEscapes: notebookPage,
      processEnvironments: true,
    },
    svg: { fontCache: "global" },
  };
  const script = document.createElement("script");
  script.src = new URL("mathjax/tex-svg-full.js", document.currentScript.src).href;
  document.head.appendChild(script);
})();
