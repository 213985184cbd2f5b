/* CLIP-Scope Explorer: small progressive enhancements (the pages work without them).
   Overlay on/off and opacity (remembered), keyboard shortcuts (elements with data-key;
   #shortcuts-toggle turns them off),
   copy-link buttons (data-copy), and the large-view dialog filled by htmx (#modal-body).
   No inline script anywhere: the Content-Security-Policy forbids it. */
(function () {
  "use strict";
  var STORE = "clipscope-overlay";
  var root = document.documentElement;

  function prefs() {
    try { return JSON.parse(window.localStorage.getItem(STORE)) || {}; } catch (err) { return {}; }
  }
  function save(update) {
    var next = Object.assign(prefs(), update);
    try { window.localStorage.setItem(STORE, JSON.stringify(next)); } catch (err) { /* private mode */ }
    return next;
  }
  function setOpacity(value) { root.style.setProperty("--overlay-opacity", String(value)); }

  function apply() {
    var p = prefs();
    var toggle = document.getElementById("overlay-toggle");
    var slider = document.getElementById("overlay-opacity");
    if (toggle && typeof p.on === "boolean") { toggle.checked = p.on; }
    if (slider && typeof p.opacity === "number") { slider.value = String(p.opacity); }
    setOpacity(typeof p.opacity === "number" ? p.opacity : 0.7);
    document.querySelectorAll("[data-copy]").forEach(function (button) { button.hidden = false; });
    var shortcuts = document.getElementById("shortcuts-toggle");
    if (shortcuts) {
      shortcuts.checked = p.shortcuts !== false;
      shortcuts.closest(".shortcuts").hidden = false;
    }
  }

  function copy(text, button) {
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      window.setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { window.prompt("Copy this link:", text); });
    } else {
      window.prompt("Copy this link:", text);
    }
  }

  document.addEventListener("change", function (event) {
    if (event.target.id === "overlay-toggle") { save({ on: event.target.checked }); }
    if (event.target.id === "shortcuts-toggle") { save({ shortcuts: event.target.checked }); }
  });
  document.addEventListener("input", function (event) {
    if (event.target.id === "overlay-opacity") {
      var value = Number(event.target.value);
      save({ opacity: value });
      setOpacity(value);
    }
  });
  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || prefs().shortcuts === false) { return; }
    var t = event.target;
    var typing = t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
      (t.tagName === "INPUT" && t.type !== "checkbox" && t.type !== "range"));
    if (typing) { return; }
    var target = document.querySelector('[data-key="' + event.key + '"]');
    if (!target) { return; }
    event.preventDefault();
    target.click();
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (button) { copy(button.getAttribute("data-copy"), button); }
    var dialog = document.getElementById("modal");
    if (dialog && event.target === dialog) { dialog.close(); }
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var dialog = document.getElementById("modal");
    if (dialog && event.detail.target && event.detail.target.id === "modal-body" && !dialog.open) {
      dialog.showModal();
    }
  });
  document.addEventListener("htmx:afterSwap", apply);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", apply);
  } else {
    apply();
  }
}());
