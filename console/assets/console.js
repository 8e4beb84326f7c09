// Edgebind console: live regions. An element with data-live="URL" has its
// contents replaced every two seconds by the HTML fragment at URL (same
// session cookie), so presence and results change without a reload.
(function () {
  "use strict";
  function refresh(el) {
    fetch(el.dataset.live, { credentials: "same-origin", headers: { Accept: "text/html-fragment" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null && el.innerHTML !== html) { el.innerHTML = html; } })
      .catch(function () {});
  }
  function start() {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      setInterval(function () { refresh(el); }, 2000);
    });
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) {
        if (!window.confirm(f.dataset.confirm)) { e.preventDefault(); }
      });
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
