// Keyboard shortcuts of the review page: a accept, c correct (focus the path), s skip, Enter in
// the path files the listing under it, Enter on the queue starts. Served from this origin only.
document.addEventListener("DOMContentLoaded", () => {
  const path = document.getElementById("path");
  const press = (id) => { const button = document.getElementById(id); if (button) { button.click(); } };
  document.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement;
    if (typing) {
      if (event.target === path && event.key === "Enter") { event.preventDefault(); press("correct"); }
      if (event.target === path && event.key === "Escape") { path.blur(); }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (event.key === "a") { event.preventDefault(); press("accept"); }
    else if (event.key === "s") { event.preventDefault(); press("skip"); }
    else if (event.key === "c" && path) { event.preventDefault(); path.focus(); }
    else if (event.key === "Enter") { press("start-button"); }
  });
});
