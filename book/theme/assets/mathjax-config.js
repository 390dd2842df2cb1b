// MathJax 3, served by the site itself (assets/mathjax/tex-svg-full.js: SVG output, so no web fonts).
// Chapter pages: pymdownx.arithmatex has already turned $...$ into \(...\) and $$...$$ into \[...\].
// Notebook pages: nbconvert leaves Jupyter's $...$ and $$...$$ in the markdown cells as they were written.
// Code (pre, code) is never typeset: MathJax skips those tags.
const notebookPage = document.querySelector(".jupyter-wrapper") !== null;
window.MathJax = {
  tex: {
    inlineMath: notebookPage ? [["$", "$"], ["\\(", "\\)"]] : [["\\(", "\\)"]],
    displayMath: notebookPage ? [["$$", "$$"], ["\\[", "\\]"]] : [["\\[", "\\]"]],
    processEscapes: notebookPage,
    processEnvironments: true,
  },
  svg: { fontCache: "global" },
};
