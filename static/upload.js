/* CLIP-Scope Explorer: the upload page and its result (the page works without this file).
   Upload: submit on file choice, drag-and-drop and paste (Ctrl+V) fill the form's file input.
   Result: "Show on image" puts a feature's heatmap on the big image; clicking a patch (or
   arrows and Enter in the patch grid) lists the features firing there (from the layer's data-patches,
   linked to data-feature-base + number); upload errors are swapped in like results.
   No inline script anywhere: the Content-Security-Policy forbids it. */
(function () {
  "use strict";

  function uploadForm() { return document.getElementById("upload-form"); }

  function submitFile(file) {
    var form = uploadForm();
    if (!form || !file) { return; }
    var input = form.querySelector("input[type=file]");
    var transfer = new DataTransfer();
    transfer.items.add(file);
    input.files = transfer.files;
    form.requestSubmit();
  }

  function firstImage(files) {
    for (var i = 0; files && i < files.length; i += 1) {
      if (!files[i].type || files[i].type.indexOf("image/") === 0) { return files[i]; }
    }
    return files && files.length ? files[0] : null;
  }

  document.addEventListener("change", function (event) {
    var form = uploadForm();
    if (form && event.target.type === "file" && form.contains(event.target) && event.target.files.length) {
      form.requestSubmit();
    }
  });
  document.addEventListener("dragover", function (event) {
    if (!uploadForm()) { return; }
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", function (event) {
    if (event.relatedTarget === null) { document.body.classList.remove("dragging"); }
  });
  document.addEventListener("drop", function (event) {
    if (!uploadForm()) { return; }
    event.preventDefault();
    document.body.classList.remove("dragging");
    submitFile(firstImage(event.dataTransfer && event.dataTransfer.files));
  });
  document.addEventListener("paste", function (event) {
    var file = uploadForm() && firstImage(event.clipboardData && event.clipboardData.files);
    if (file) {
      event.preventDefault();
      submitFile(file);
    }
  });

  /* Errors (4xx/503) from the upload or an intervention come back as a fragment for their target: show them. */
  document.addEventListener("htmx:beforeSwap", function (event) {
    var target = event.detail.target;
    if (target && (target.id === "upload-result" || target.id === "intervention") && event.detail.xhr.status >= 400) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  /* The patch grid is focusable (one Tab stop) only here: without this script the patches do nothing. */
  function enableGrid(section) {
    var svg = section.querySelector("svg.live");
    if (svg.getAttribute("role") === "group") { return; }
    svg.setAttribute("role", "group");  /* an img's children are hidden from assistive technology */
    svg.querySelectorAll(".cells rect").forEach(function (cell, i) { cell.tabIndex = i ? -1 : 0; });
    section.querySelector(".patch-hint").hidden = false;
  }

  function reveal() {
    document.querySelectorAll(".live-feature .show-overlay, .live-feature .edit-feature").forEach(function (b) { b.hidden = false; });
    document.querySelectorAll(".live-view[data-patches]").forEach(enableGrid);
  }

  function showFeature(item) {
    var section = item.closest(".live-view");
    var map = section.querySelector("image.feature-map");
    var overlay = item.querySelector("img.overlay");
    if (map && overlay) { map.setAttribute("href", overlay.getAttribute("src")); }
    var name = section.querySelector(".shown-feature");
    if (name) { name.textContent = item.getAttribute("data-feature"); }
    section.querySelectorAll(".live-feature.shown").forEach(function (li) { li.classList.remove("shown"); });
    item.classList.add("shown");
    var radio = section.querySelector('input[type=radio][value="feature"]');
    if (radio) { radio.checked = true; }
  }

  function labels(section) {
    var known = {};
    section.querySelectorAll(".live-feature").forEach(function (li) {
      known[li.getAttribute("data-feature")] = li.getAttribute("data-label");
    });
    return known;
  }

  function listPatch(cell) {
    var section = cell.closest(".live-view");
    var data = section.getAttribute("data-patches");
    if (!data) { return; }
    if (!section.patchData) { section.patchData = JSON.parse(data); }
    var p = Number(cell.getAttribute("data-p"));
    var width = Number(section.getAttribute("data-grid"));
    var featureBase = section.getAttribute("data-feature-base");
    var inIndex = section.getAttribute("data-in-index") === "true";
    var hits = section.patchData[p] || [];
    var known = labels(section);
    var box = section.querySelector(".patch-list");
    box.textContent = "";
    var head = document.createElement("p");
    head.className = "patch-head";
    head.textContent = "Patch (row " + Math.floor(p / width) + ", column " + (p % width) + "): " +
      (hits.length ? hits.length + " feature" + (hits.length === 1 ? "" : "s") + " fire" + (hits.length === 1 ? "s" : "") : "nothing fires");
    box.appendChild(head);
    var list = document.createElement("ol");
    hits.forEach(function (hit) {
      var li = document.createElement("li");
      var name = inIndex ? document.createElement("a") : document.createElement("span");
      if (inIndex) { name.href = featureBase + hit[0]; }
      name.textContent = "Feature " + hit[0];
      li.appendChild(name);
      var value = document.createElement("b");
      value.textContent = " " + hit[1];
      li.appendChild(value);
      if (known[hit[0]]) {
        var label = document.createElement("span");
        label.className = "muted";
        label.textContent = " " + known[hit[0]];
        li.appendChild(label);
      }
      list.appendChild(li);
    });
    box.appendChild(list);
    section.querySelectorAll("rect.picked").forEach(function (r) {
      r.classList.remove("picked");
      r.removeAttribute("aria-selected");
    });
    cell.classList.add("picked");
    cell.setAttribute("aria-selected", "true");
  }

  function rove(cell) {  /* the Tab stop moves with focus */
    cell.closest(".cells").querySelector('[tabindex="0"]').tabIndex = -1;
    cell.tabIndex = 0;
    cell.focus();
  }

  document.addEventListener("keydown", function (event) {
    var cell = event.target.closest && event.target.closest('rect[role="gridcell"]');
    if (!cell || event.altKey || event.ctrlKey || event.metaKey) { return; }
    var width = Number(cell.closest(".live-view").getAttribute("data-grid"));
    var p = Number(cell.getAttribute("data-p"));
    var column = p % width;
    var step = { ArrowLeft: column ? -1 : 0, ArrowRight: column < width - 1 ? 1 : 0, ArrowUp: -width,
      ArrowDown: width, Home: -column, End: width - 1 - column, Enter: 0, " ": 0 }[event.key];
    if (step === undefined) { return; }
    event.preventDefault();  /* no page scroll */
    var next = cell.closest(".cells").querySelector('[data-p="' + (p + step) + '"]');
    if (event.key === "Enter" || event.key === " ") {
      listPatch(cell);
    } else if (next) {
      rove(next);
    }
  });

  /* Interventions: "Edit" fills the form's layer and feature; Shift-click toggles a patch in its list. */
  function interveneForm() { return document.querySelector("form.intervene-form"); }

  function editFeature(button) {
    var form = interveneForm();
    form.elements.layer.value = button.getAttribute("data-layer");
    form.elements.feature.value = button.closest(".live-feature").getAttribute("data-feature");
    form.scrollIntoView({ block: "nearest" });
    form.elements.scale.focus();
  }

  function togglePatch(cell) {
    var field = interveneForm().elements.patches;
    var p = cell.getAttribute("data-p");
    var chosen = field.value.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
    var at = chosen.indexOf(p);
    if (at >= 0) { chosen.splice(at, 1); } else { chosen.push(p); }
    field.value = chosen.join(",");
    cell.classList.toggle("chosen", at < 0);
  }

  document.addEventListener("click", function (event) {
    var edit = event.target.closest && event.target.closest(".edit-feature");
    if (edit && interveneForm()) {
      editFeature(edit);
      return;
    }
    var patch = event.shiftKey && event.target.closest && event.target.closest("svg.live rect[data-p]");
    if (patch && interveneForm()) {
      togglePatch(patch);
      return;
    }
    var button = event.target.closest && event.target.closest(".show-overlay");
    if (button) {
      showFeature(button.closest(".live-feature"));
      return;
    }
    var cell = event.target.closest && event.target.closest("svg.live rect[data-p]");
    if (cell) { listPatch(cell); }
    if (cell && cell.hasAttribute("tabindex")) { rove(cell); }
  });
  document.addEventListener("htmx:afterSettle", reveal);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", reveal);
  } else {
    reveal();
  }
}());
