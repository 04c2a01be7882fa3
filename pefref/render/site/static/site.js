/* pefref site: small enhancements. Every page works without this script. */
(function () {
  "use strict";

  function cellValue(cell) {
    if (!cell) return "";
    var v = cell.getAttribute("data-sort");
    return v !== null ? v : cell.textContent.trim().toLowerCase();
  }

  var NUMBER = /^-?\d+(\.\d+)?$/;

  function compareValues(a, b) {
    if (NUMBER.test(a) && NUMBER.test(b)) return parseFloat(a) - parseFloat(b);
    return a < b ? -1 : a > b ? 1 : 0;
  }

  /* Sortable tables: a button in each column header sorts the rows by that column. */
  function makeSortable(table) {
    var heads = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(heads, function (th, col) {
      if (th.classList.contains("nosort")) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      button.addEventListener("click", function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows = rows.map(function (r, i) { return [r, i]; });
        rows.sort(function (p, q) {
          var c = compareValues(cellValue(p[0].cells[col]), cellValue(q[0].cells[col]));
          if (dir === "descending") c = -c;
          return c || p[1] - q[1];
        });
        rows.forEach(function (p) { body.appendChild(p[0]); });
      });
    });
  }

  /* The index: a text filter and a form filter over the technique rows. */
  function setupIndex() {
    var controls = document.getElementById("index-controls");
    var table = document.getElementById("techniques");
    if (!controls || !table) return;
    controls.hidden = false;
    var input = document.getElementById("filter");
    var form = document.getElementById("form-filter");
    var status = document.getElementById("filter-count");
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    function apply() {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var wanted = form.value;
      var shown = 0;
      rows.forEach(function (r) {
        var text = r.textContent.toLowerCase() + " " + r.getAttribute("data-id");
        var ok = words.every(function (w) { return text.indexOf(w) >= 0; });
        if (ok && wanted) ok = (" " + r.getAttribute("data-forms") + " ").indexOf(" " + wanted + " ") >= 0;
        r.hidden = !ok;
        if (ok) shown += 1;
      });
      status.textContent = shown + " of " + rows.length + " techniques";
    }
    input.addEventListener("input", apply);
    form.addEventListener("change", apply);
    var q = new URLSearchParams(window.location.search).get("q");
    if (q) input.value = q;
    apply();
  }

  /* The comparison: ?ids=a,b,c chooses the columns; the picker adds and drops them and keeps the address in step. */
  function setupCompare() {
    var table = document.getElementById("comparison");
    var dataEl = document.getElementById("compare-data");
    var picker = document.getElementById("picker");
    if (!table || !dataEl || !picker) return;
    var data = JSON.parse(dataEl.textContent);
    var names = {};
    var order = data.techniques.map(function (t) { names[t.id] = t.name; return t.id; });
    var params = new URLSearchParams(window.location.search);
    var requested = [];
    params.getAll("ids").forEach(function (v) { requested = requested.concat(v.split(",")); });
    requested = requested.map(function (s) { return s.trim(); }).filter(Boolean);
    var unknown = requested.filter(function (id) { return !(id in names); });
    var chosen = [];
    requested.forEach(function (id) { if (id in names && chosen.indexOf(id) < 0) chosen.push(id); });
    var select = document.getElementById("pick");
    var list = document.getElementById("chosen");
    var status = document.getElementById("compare-status");
    picker.hidden = false;

    function updateUrl() {
      var url = window.location.pathname + (chosen.length ? "?ids=" + chosen.join(",") : "") + window.location.hash;
      try { window.history.replaceState(null, "", url); } catch (e) { /* some browsers refuse on file:// */ }
    }

    function render() {
      var visible = chosen.length ? chosen : order;
      var shownSet = {};
      visible.forEach(function (id) { shownSet[id] = true; });
      Array.prototype.forEach.call(table.rows, function (row) {
        var cells = {};
        Array.prototype.forEach.call(row.cells, function (c) {
          var id = c.getAttribute("data-col");
          if (id) cells[id] = c;
        });
        if (!Object.keys(cells).length) {
          if (row.cells.length === 1) row.cells[0].colSpan = visible.length + 1;
          return;
        }
        visible.forEach(function (id) { if (cells[id]) row.appendChild(cells[id]); });
        order.forEach(function (id) {
          if (cells[id]) {
            cells[id].hidden = !shownSet[id];
            if (!shownSet[id]) row.appendChild(cells[id]);
          }
        });
      });
      list.textContent = "";
      chosen.forEach(function (id) {
        var li = document.createElement("li");
        li.setAttribute("data-id", id);
        var label = document.createElement("span");
        label.textContent = names[id];
        var drop = document.createElement("button");
        drop.type = "button";
        drop.className = "drop";
        drop.setAttribute("aria-label", "Remove " + names[id]);
        drop.setAttribute("data-id", id);
        drop.textContent = "×";
        drop.addEventListener("click", function () {
          chosen = chosen.filter(function (x) { return x !== id; });
          updateUrl();
          render();
        });
        li.appendChild(label);
        li.appendChild(drop);
        list.appendChild(li);
      });
      Array.prototype.forEach.call(select.options, function (o) { o.disabled = chosen.indexOf(o.value) >= 0; });
      var msg = chosen.length ? "Comparing " + chosen.length + " of " + order.length + " techniques." : "Showing all " + order.length + " techniques; add some to compare them.";
      if (unknown.length) msg += " Unknown: " + unknown.join(", ") + ".";
      status.textContent = msg;
    }

    function add() {
      var id = select.value;
      if (id && chosen.indexOf(id) < 0) chosen.push(id);
      select.value = "";
      updateUrl();
      render();
    }
    document.getElementById("pick-add").addEventListener("click", add);
    document.getElementById("pick-clear").addEventListener("click", function () {
      chosen = [];
      updateUrl();
      render();
    });
    if (requested.length) updateUrl();
    render();
  }

  /* Diagrams: scaled to their column; a button shows one at its own size inside its frame (scroll or drag to pan). */
  function setupDiagrams() {
    Array.prototype.forEach.call(document.querySelectorAll("figure.diagram"), function (fig) {
      var frame = fig.querySelector(".frame");
      var caption = fig.querySelector("figcaption");
      if (!frame || !caption) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "zoom";
      button.setAttribute("aria-pressed", "false");
      button.textContent = "Full size";
      button.addEventListener("click", function () {
        var full = !frame.classList.contains("full");
        frame.classList.toggle("full", full);
        button.setAttribute("aria-pressed", full ? "true" : "false");
        button.textContent = full ? "Fit to width" : "Full size";
      });
      caption.appendChild(button);
      var drag = null;
      frame.addEventListener("pointerdown", function (e) {
        if (!frame.classList.contains("full")) return;
        drag = { x: e.clientX, y: e.clientY, left: frame.scrollLeft, top: frame.scrollTop };
      });
      window.addEventListener("pointermove", function (e) {
        if (!drag) return;
        frame.scrollLeft = drag.left - (e.clientX - drag.x);
        frame.scrollTop = drag.top - (e.clientY - drag.y);
      });
      window.addEventListener("pointerup", function () { drag = null; });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupDiagrams();
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), makeSortable);
    setupIndex();
    setupCompare();
  });
})();
