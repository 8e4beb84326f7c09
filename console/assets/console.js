// Edgebind console: live regions. An element with data-live="URL" opens a
// server-sent event stream on URL (same session cookie); each `update`
// event carries {"regions": {id: html}} and replaces the contents of those
// elements, so presence and results change without a reload. `expired`
// means the session ended: reloading leads to the login page.
(function () {
  "use strict";
  function listen(url) {
    var source = new EventSource(url, { withCredentials: true });
    source.addEventListener("update", function (e) {
      var regions = JSON.parse(e.data).regions || {};
      Object.keys(regions).forEach(function (id) {
        var el = document.getElementById(id);
        if (el && el.innerHTML !== regions[id]) { el.innerHTML = regions[id]; }
      });
      document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
    });
    source.addEventListener("expired", function () {
      source.close();
      window.location.reload();
    });
  }
  function start() {
    document.querySelectorAll("[data-live]").forEach(function (el) { listen(el.dataset.live); });
    // A form with data-confirm asks first; with data-confirm-actions too,
    // only when its selected action is one of those (reboot...).
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) {
        var only = f.dataset.confirmActions;
        var action = f.elements.action ? f.elements.action.value : "";
        if (only && only.split(",").indexOf(action) < 0) { return; }
        var question = only ? "Send " + action + "? " + f.dataset.confirm : f.dataset.confirm;
        if (!window.confirm(question)) { e.preventDefault(); }
      });
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
