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

  /* Sortable tables: a button in each column header sorts the rows by that column; a table shown as cards on a
     phone (its header hidden) gets a "Sort by" menu with the same orders. */
  function makeSortable(table) {
    var heads = table.tHead ? table.tHead.rows[0].cells : [];
    var menu = table.classList.contains("cards") ? sortMenu(table) : null;
    function sortBy(col, dir) {
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      heads[col].setAttribute("aria-sort", dir);
      if (menu) menu.value = col + " " + dir;
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows).map(function (r, i) { return [r, i]; });
      rows.sort(function (p, q) {
        var c = compareValues(cellValue(p[0].cells[col]), cellValue(q[0].cells[col]));
        if (dir === "descending") c = -c;
        return c || p[1] - q[1];
      });
      rows.forEach(function (p) { body.appendChild(p[0]); });
    }
    Array.prototype.forEach.call(heads, function (th, col) {
      if (th.classList.contains("nosort")) return;
      var name = th.textContent.trim();
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      button.addEventListener("click", function () {
        sortBy(col, th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending");
      });
      if (!menu || !name) return;
      ["ascending", "descending"].forEach(function (dir) {
        var opt = document.createElement("option");
        opt.value = col + " " + dir;
        opt.textContent = name + (dir === "ascending" ? " ↑" : " ↓");
        menu.appendChild(opt);
      });
    });
    if (menu) menu.addEventListener("change", function () {
      var v = menu.value.split(" ");
      if (v.length === 2) sortBy(parseInt(v[0], 10), v[1]);
    });
  }

  function sortMenu(table) {
    var label = document.createElement("label");
    label.className = "card-sort";
    label.textContent = "Sort by ";
    var menu = document.createElement("select");
    menu.className = "card-sort";
    var none = document.createElement("option");
    none.value = "";
    none.textContent = "as listed";
    menu.appendChild(none);
    label.appendChild(menu);
    var anchor = table.closest(".scroll") || table;
    anchor.parentNode.insertBefore(label, anchor);
    return menu;
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
        var text = r.textContent.toLowerCase() + " " + r.getAttribute("data-id") + " " + (r.getAttribute("data-search") || "");
        var ok = words.every(function (w) { return text.indexOf(w) >= 0; });
        if (ok && wanted) ok = (" " + r.getAttribute("data-forms") + " ").indexOf(" " + wanted + " ") >= 0;
        r.hidden = !ok;
        if (ok) shown += 1;
      });
      status.textContent = shown + " of " + rows.length + " techniques";
    }
    input.addEventListener("input", apply);
    form.addEventListener("change", apply);
    var picked = document.getElementById("selected-count");
    if (picked) {
      table.addEventListener("change", function () {
        var n = table.querySelectorAll('input[name="ids"]:checked').length;
        picked.textContent = n ? n + " selected" : "";
      });
    }
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
      var figures = {};
      Array.prototype.forEach.call(document.querySelectorAll("figure.compare-diagram"), function (f) {
        figures[f.getAttribute("data-col")] = f;
      });
      if (Object.keys(figures).length) {  // the diagrams below the table follow its columns: shown, hidden and ordered
        var section = figures[Object.keys(figures)[0]].parentNode;
        visible.forEach(function (id) { if (figures[id]) section.appendChild(figures[id]); });
        order.forEach(function (id) { if (figures[id]) { figures[id].hidden = !shownSet[id]; if (!shownSet[id]) section.appendChild(figures[id]); } });
      }
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
          unknown = [];
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
      applySettings(data, table);
      markDiffering(table, visible);
    }

    function add() {
      unknown = [];
      var id = select.value;
      if (id && chosen.indexOf(id) < 0) chosen.push(id);
      select.value = "";
      updateUrl();
      render();
    }
    document.getElementById("pick-add").addEventListener("click", add);
    document.getElementById("pick-clear").addEventListener("click", function () {
      unknown = [];
      chosen = [];
      updateUrl();
      render();
    });
    if (requested.length) updateUrl();
    ["set-size", "set-sites", "only-differ"].forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.addEventListener("change", render);
    });
    render();
  }

  /* The compare page's matched settings: every column counted with its size hyperparameter at one value and on one set
     of sites (the counts were made at build time); the column headers say the settings each technique has. */
  function applySettings(data, table) {
    var size = document.getElementById("set-size");
    var sites = document.getElementById("set-sites");
    var row = document.getElementById("matched-row");
    if (!size || !sites || !row) return;
    var fmt = new Intl.NumberFormat("en-US");
    data.techniques.forEach(function (t) {
      var head = table.tHead.querySelector('th[data-col="' + t.id + '"]');
      var cell = row.querySelector('td[data-col="' + t.id + '"]');
      var value = t.knob ? size.value : "";
      var got = t.counts[sites.value + "|" + value] || [null, "not counted"];
      cell.textContent = "";
      if (got[0] === null) {
        var na = document.createElement("span");
        na.textContent = "n/a";
        na.title = got[1];
        cell.appendChild(na);
      } else {
        cell.textContent = fmt.format(got[0]);
      }
      if (!head) return;
      var spans = head.querySelectorAll("span.settings");
      var text = spans[0].getAttribute("data-default");
      if (t.knob && value) text = text.replace(new RegExp("(^|, )" + t.knob + "=[^,]*"), "$1" + t.knob + "=" + value);
      spans[0].textContent = text;
      spans[0].classList.toggle("changed", !!(t.knob && value));
      spans[1].textContent = "sites: " + (sites.value === "default" ? spans[1].getAttribute("data-default") : sites.value);
      spans[1].classList.toggle("changed", sites.value !== "default");
    });
  }

  /* Rows whose shown cells are not all the same are marked (and, when asked, the others hidden). */
  function markDiffering(table, visible) {
    var only = document.getElementById("only-differ");
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      if (row.classList.contains("group")) return;
      var seen = {};
      var n = 0;
      visible.forEach(function (id) {
        var c = row.querySelector('td[data-col="' + id + '"]');
        if (!c) return;
        var v = c.textContent.trim();
        if (!(v in seen)) { seen[v] = true; n += 1; }
      });
      var differs = n > 1;
      row.classList.toggle("differs", differs);
      row.hidden = !!(only && only.checked && !differs);
    });
  }


  /* The chooser: a model, a budget (count or %) and constraints; the techniques that fit, smallest first. */
  function parseBudget(text, base) {
    var t = text.replace(/[,_\s]/g, "").toLowerCase();
    if (!t) return null;
    var pct = /%$/.test(t);
    if (pct) t = t.slice(0, -1);
    var unit = { k: 1e3, m: 1e6, g: 1e9, b: 1e9 }[t.slice(-1)];
    if (unit) t = t.slice(0, -1);
    if (!/^\d*\.?\d+(e[+-]?\d+)?$/.test(t)) return NaN;
    var v = parseFloat(t) * (unit || 1);
    return pct ? v / 100 * base : v;
  }

  function setupChooser() {
    var form = document.getElementById("chooser");
    var dataEl = document.getElementById("choose-data");
    var table = document.getElementById("choices");
    if (!form || !dataEl || !table) return;
    var data = JSON.parse(dataEl.textContent);
    var shapes = {};
    data.shapes.forEach(function (s) { shapes[s.name] = s; });
    var model = document.getElementById("choose-model");
    var budget = document.getElementById("choose-budget");
    var merge = document.getElementById("choose-mergeable");
    var latency = document.getElementById("choose-latency");
    var memory = document.getElementById("choose-memory");
    var status = document.getElementById("choose-status");
    var body = table.tBodies[0];
    var fmt = new Intl.NumberFormat("en-US");
    form.hidden = false;

    var labels = Array.prototype.map.call(table.tHead.rows[0].cells, function (th) { return th.textContent.trim(); });

    function cell(row, text, cls) {
      var td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      var at = 0;
      Array.prototype.forEach.call(row.cells, function (c) { at += c.colSpan; });
      var label = labels[at];
      if (label) td.setAttribute("data-label", label);
      row.appendChild(td);
      return td;
    }

    function apply() {
      var shape = shapes[model.value];
      var limit = parseBudget(budget.value, shape.base);
      budget.setAttribute("aria-invalid", limit !== null && isNaN(limit) ? "true" : "false");
      var fits = [], na = [];
      data.techniques.forEach(function (t) {
        var c = t.counts[shape.name];
        if (merge.checked && !t.mergeable[shape.family]) return;
        if (latency.checked && !t.no_latency[shape.family]) return;
        if (memory.checked && !t.less_memory) return;
        if (!c) { na.push(t); return; }
        if (limit !== null && !isNaN(limit) && c[0] > limit) return;
        fits.push(t);
      });
      fits.sort(function (a, b) { return a.counts[shape.name][0] - b.counts[shape.name][0] || (a.name < b.name ? -1 : 1); });
      body.textContent = "";
      var shown = limit !== null && !isNaN(limit) ? fits : fits.concat(na);
      shown.forEach(function (t, i) {
        var c = t.counts[shape.name];
        var row = document.createElement("tr");
        row.setAttribute("data-id", t.id);
        cell(row, String(i + 1), "num rank");
        var th = document.createElement("th");
        th.scope = "row";
        var a = document.createElement("a");
        a.href = "techniques/" + t.id + ".html";
        a.textContent = t.name;
        th.appendChild(a);
        var id = document.createElement("span");
        id.className = "id";
        id.textContent = " " + t.id;
        th.appendChild(id);
        row.appendChild(th);
        if (c) {
          cell(row, fmt.format(c[0]), "num");
          cell(row, c[2] + "%", "num");
        } else {
          var td = cell(row, "n/a ", "na");
          td.colSpan = 2;
          td.title = "not applicable: " + t.why[shape.name];
          var why = document.createElement("span");
          why.className = "na-why";
          why.textContent = t.why[shape.name];
          td.appendChild(why);
        }
        cell(row, t.mergeable[shape.family] ? "yes" : "no");
        cell(row, t.latency[shape.family]);
        cell(row, t.less_memory ? "yes" : "no");
        body.appendChild(row);
      });
      document.getElementById("choose-shape").textContent = shape.name;
      var msg = fits.length + " of " + data.techniques.length + " techniques fit " + shape.name;
      if (limit !== null && isNaN(limit)) msg += " (the budget is not a number: write e.g. 5M, 2e6 or 0.1%)";
      else if (limit !== null) msg += " within " + fmt.format(Math.floor(limit)) + " trainable parameters";
      status.textContent = msg + ".";
    }
    [model, merge, latency, memory].forEach(function (el) { el.addEventListener("change", apply); });
    budget.addEventListener("input", apply);
    form.addEventListener("submit", function (e) { e.preventDefault(); });
    apply();
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
      function show(full) {
        frame.classList.toggle("full", full);
        button.setAttribute("aria-pressed", full ? "true" : "false");
        button.textContent = full ? "Fit to width" : "Full size";
      }
      button.addEventListener("click", function () { show(!frame.classList.contains("full")); });
      readable(fig, frame);
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

  /* An inline drawing wider than its column may use the page's width on a wide screen ("wide"). Everywhere it is
     scaled to fit its column by default; "Full size" shows it at its own size, panned inside the frame. */
  function readable(fig, frame) {
    var svg = frame.querySelector("svg");
    if (!svg || !svg.width || !svg.width.baseVal) return;
    if (svg.width.baseVal.value > fig.parentNode.clientWidth) fig.classList.add("wide");
  }

  /* A Copy button on each peft config (the text stays selectable without the script). */
  function setupCopy() {
    Array.prototype.forEach.call(document.querySelectorAll("details.peft pre.code"), function (pre) {
      if (!navigator.clipboard) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "zoom copy";
      button.textContent = "Copy";
      button.addEventListener("click", function () {
        navigator.clipboard.writeText(pre.textContent).then(function () { button.textContent = "Copied"; },
                                                            function () { button.textContent = "Select the text to copy"; });
      });
      pre.parentNode.insertBefore(button, pre.nextSibling);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupCopy();
    setupDiagrams();
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), makeSortable);
    setupIndex();
    setupCompare();
    setupChooser();
  });
})();
