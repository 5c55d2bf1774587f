/* precision-suite report: draws the charts (uPlot) from the inlined JSON blob, lazily as they
   scroll into view, and wires the filter, anchors and open/close buttons. No network. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var HEIGHT = 250;
  var TENSOR_COLOURS = {pre: "#1f77b4", post: "#e8710a", grad: "#2a9d3a", grad_pre: "#8e44ad", wgrad: "#8c564b"};
  var STAT_STYLE = {rms: {width: 2}, amax: {width: 1.5, dash: [7, 3]}, amin: {width: 1.2, dash: [2, 3]}};
  var STAT_LABEL = {rms: "rms", amax: "max |x|", amin: "min |x|≠0"};
  var FRACTION_COLOURS = {underflow: "#d62728", flushed: "#e377c2", subnormal: "#d99a00", zero: "#444444"};
  var QUANT_COLOURS = {gemm_in: "#1f77b4", gemm_w: "#e8710a", grad_gemm_in: "#2a9d3a"};
  var QUANT_DASH = {all: undefined, bulk: [6, 3], flushed: undefined, saturated: [6, 3], max: undefined,
                    min: [6, 3], floor: [2, 3]};
  var QUANT_LABEL = {all: "SQNR", bulk: "bulk SQNR", flushed: "flushed", saturated: "saturated",
                     max: "largest scale", min: "smallest scale", floor: "E4M3 scale floor"};
  var PALETTE = ["#1f77b4", "#e8710a", "#2a9d3a", "#d62728", "#8e44ad", "#8c564b", "#e377c2", "#7f7f7f",
                 "#17becf", "#bcbd22", "#393b79", "#ad494a"];
  var charts = [];
  var drawn = 0;

  function range(n, start) {
    var xs = new Array(n);
    for (var i = 0; i < n; i++) xs[i] = start + i;
    return xs;
  }

  function fmtNum(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2).replace("e", "e");
    return String(+v.toPrecision(5));
  }

  function bandLines(fmt) {
    return [[fmt.log2_max, "#d62728", [], "max " + fmtNum(fmt.max)],
            [fmt.log2_normal, "#b07800", [6, 4], "smallest normal " + fmtNum(fmt.smallest_normal)],
            [fmt.log2_subnormal, "#555555", [3, 3], "smallest subnormal " + fmtNum(fmt.smallest_subnormal)]];
  }

  /* Horizontal bands at the format's max, smallest normal and smallest subnormal (drawn under the
     series), and vertical markers at the measured and predicted failure layers (drawn over them). */
  function rangePlugin(fmt, markers, empty) {
    function y(u, v) { return u.valToPos(v, "y", true); }
    function x(u, v) { return u.valToPos(v, "x", true); }
    return {hooks: {
      drawClear: [function (u) {
        var ctx = u.ctx, b = u.bbox, top = b.top, bottom = b.top + b.height, px = uPlot.pxRatio;
        function clampY(v) { return Math.min(bottom, Math.max(top, y(u, v))); }
        ctx.save();
        if (!fmt) { ctx.restore(); return; }
        var over = fmt.log2_overflow != null ? fmt.log2_overflow : fmt.log2_max;
        ctx.fillStyle = "rgba(214, 39, 40, 0.10)";
        ctx.fillRect(b.left, top, b.width, clampY(over) - top);
        ctx.fillStyle = "rgba(217, 154, 0, 0.13)";
        ctx.fillRect(b.left, clampY(fmt.log2_normal), b.width, clampY(fmt.log2_subnormal) - clampY(fmt.log2_normal));
        ctx.fillStyle = "rgba(0, 0, 0, 0.08)";
        var zero = clampY(fmt.log2_subnormal - 1);
        ctx.fillRect(b.left, zero, b.width, bottom - zero);
        var lines = bandLines(fmt);
        lines.forEach(function (l) {
          var yy = y(u, l[0]);
          if (yy < top || yy > bottom) return;
          ctx.strokeStyle = l[1];
          ctx.lineWidth = px;
          ctx.setLineDash(l[2].map(function (d) { return d * px; }));
          ctx.beginPath(); ctx.moveTo(b.left, yy); ctx.lineTo(b.left + b.width, yy); ctx.stroke();
        });
        ctx.setLineDash([]);
        if (empty) {
          ctx.fillStyle = "#444";
          ctx.textAlign = "center";
          ctx.font = (13 * px) + "px system-ui, sans-serif";
          ctx.fillText(empty, b.left + b.width / 2, b.top + b.height / 2);
        }
        ctx.restore();
      }],
      draw: [function (u) {
        var ctx = u.ctx, b = u.bbox, px = uPlot.pxRatio;
        ctx.save();
        if (fmt) {
          ctx.font = (11 * px) + "px system-ui, sans-serif";
          ctx.textAlign = "right";
          bandLines(fmt).forEach(function (l, i) {
            var yy = y(u, l[0]);
            if (yy < b.top || yy > b.top + b.height) return;
            // the subnormal label goes under its line, so it never collides with the normal one above
            var ty = Math.min(i === 2 ? yy + 12 * px : yy - 3 * px, b.top + b.height - 2 * px);
            var text = l[3] + " (2^" + (+l[0].toFixed(3)) + ")";
            var w = ctx.measureText(text).width;
            ctx.fillStyle = "rgba(255, 255, 255, 0.8)";
            ctx.fillRect(b.left + b.width - 6 * px - w, ty - 10 * px, w + 4 * px, 13 * px);
            ctx.fillStyle = l[1];
            ctx.fillText(text, b.left + b.width - 4 * px, ty);
          });
        }
        if (!markers || !markers.length) { ctx.restore(); return; }
        ctx.font = (11 * px) + "px system-ui, sans-serif";
        ctx.textAlign = "left";
        markers.forEach(function (m, i) {
          var xx = x(u, m.x);
          if (xx < b.left || xx > b.left + b.width) return;
          var colour = m.kind === "theory" ? "#666666" : "#c00000";
          ctx.strokeStyle = colour;
          ctx.lineWidth = 1.5 * px;
          ctx.setLineDash(m.kind === "theory" ? [4 * px, 3 * px] : []);
          ctx.beginPath(); ctx.moveTo(xx, b.top); ctx.lineTo(xx, b.top + b.height); ctx.stroke();
          var label = m.label + " @ " + m.x;
          var w = ctx.measureText(label).width;
          var tx = xx + 4 * px + w > b.left + b.width ? xx - 4 * px - w : xx + 4 * px;
          var ty = b.top + (30 + 15 * i) * px;  // below the row of the max label
          ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
          ctx.fillRect(tx - 2 * px, ty - 10 * px, w + 4 * px, 13 * px);
          ctx.fillStyle = colour;
          ctx.fillText(label, tx, ty);
        });
        ctx.restore();
      }]
    }};
  }

  function allNull(columns) {
    return columns.every(function (col) { return col.every(function (v) { return v == null; }); });
  }

  function yRange(fmt, columns) {
    var lo = Infinity, hi = -Infinity;
    columns.forEach(function (col) {
      for (var i = 0; i < col.length; i++) {
        var v = col[i];
        if (v == null) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    });
    if (fmt) {
      lo = Math.min(lo, fmt.log2_subnormal);
      hi = Math.max(hi, fmt.log2_overflow != null ? fmt.log2_overflow : fmt.log2_max);
    }
    if (!isFinite(lo)) { lo = -1; hi = 1; }
    var pad = Math.max(2, (hi - lo) * 0.04);
    return [Math.floor(lo - pad), Math.ceil(hi + pad)];
  }

  function baseOpts(el, title, yLabel) {
    return {
      width: Math.max(280, el.clientWidth), height: HEIGHT, title: title,
      cursor: {drag: {x: true, y: false}},
      scales: {x: {time: false}},
      legend: {live: true},
      axes: [{label: "layer", size: 36, labelSize: 16}, {label: yLabel, size: 54, labelSize: 16}],
      series: [{label: "layer", value: function (u, v) { return v == null ? "—" : v; }}]
    };
  }

  function log2Value(u, v) { return v == null ? "—" : "2^" + v.toFixed(1); }
  function pctValue(u, v) { return v == null ? "—" : (100 * v).toPrecision(3) + "%"; }

  function rangeChart(el, c, kind) {
    var stats = c[kind] || {};
    var theory = c[kind === "f" ? "ft" : "bt"] || {};
    var fmt = DATA.formats[c.fmt];
    var forward = kind === "f";
    var n = forward ? c.depth + 1 : c.depth;
    var data = [range(n, forward ? 0 : 1)];
    var opts = baseOpts(el, null, "log2 |value|");
    opts.axes[1].values = function (u, vals) { return vals.map(function (v) { return v; }); };
    Object.keys(stats).forEach(function (key) {
      var parts = key.split("."), tensor = parts[0], stat = parts[1];
      var style = STAT_STYLE[stat] || {width: 1};
      data.push(stats[key]);
      opts.series.push({label: tensor.replace("_", " ") + " " + (STAT_LABEL[stat] || stat), stroke: TENSOR_COLOURS[tensor] || "#000",
                        width: style.width, dash: style.dash, points: {show: false}, value: log2Value,
                        show: stat !== "amin"});
    });
    var measured = data.slice(1);  // the y range fits the measurements and the bands, not the theory
    Object.keys(theory).forEach(function (key) {
      var values = theory[key];
      if (forward && values.length === c.depth) values = [null].concat(values);
      if (values.length !== n) return;
      data.push(values);
      opts.series.push({label: key, stroke: "#222222", width: 1.5, dash: [3, 3],
                        points: {show: false}, value: log2Value});
    });
    opts.scales.y = {range: yRange(fmt, measured)};
    opts.plugins = [rangePlugin(fmt, c[kind === "f" ? "fm" : "bm"], allNull(measured) ?
      "every value is zero, inf or NaN: nothing to draw on a log scale" : null)];
    return new uPlot(opts, data, el);
  }

  function fractionChart(el, c, kind) {
    var stats = c[kind] || {};
    var forward = kind === "ff";
    var n = forward ? c.depth + 1 : c.depth;
    var data = [range(n, forward ? 0 : 1)];
    var opts = baseOpts(el, null, "fraction");
    opts.scales.y = {range: [0, 1]};
    opts.axes[1].values = function (u, vals) { return vals.map(function (v) { return Math.round(v * 100) + "%"; }); };
    Object.keys(stats).forEach(function (key) {
      var parts = key.split("."), tensor = parts[0], stat = parts[1];
      data.push(stats[key]);
      opts.series.push({label: tensor.replace("_", " ") + " " + stat, stroke: FRACTION_COLOURS[stat] || "#000",
                        width: tensor === "post" || tensor === "grad" ? 2 : 1.2,
                        dash: tensor === "pre" || tensor === "grad_pre" ? [6, 3] : tensor === "wgrad" ? [2, 3] : undefined,
                        points: {show: false}, value: pctValue});
    });
    opts.plugins = [{hooks: {drawClear: [function (u) {
      var ctx = u.ctx, b = u.bbox, yy = u.valToPos(c.thr, "y", true), px = uPlot.pxRatio;
      ctx.save();
      ctx.strokeStyle = "#999"; ctx.lineWidth = px; ctx.setLineDash([4 * px, 3 * px]);
      ctx.beginPath(); ctx.moveTo(b.left, yy); ctx.lineTo(b.left + b.width, yy); ctx.stroke();
      ctx.fillStyle = "#777"; ctx.font = (11 * px) + "px system-ui, sans-serif"; ctx.textAlign = "right";
      ctx.fillText("event threshold " + (100 * c.thr) + "%", b.left + b.width - 4 * px, yy - 3 * px);
      ctx.restore();
    }]}}];
    return new uPlot(opts, data, el);
  }

  function compareChart(el, cmp) {
    var first = DATA.cases[cmp.cases[0]];
    var fmt = DATA.formats[cmp.format];
    var depth = 0;
    cmp.cases.forEach(function (i) { depth = Math.max(depth, DATA.cases[i].depth); });
    var data = [range(depth + 1, 0)];
    var opts = baseOpts(el, null, "log2 post rms");
    cmp.cases.forEach(function (i, k) {
      var values = (DATA.cases[i].f || {})["post.rms"] || [];
      while (values.length < depth + 1) values = values.concat([null]);
      data.push(values);
      opts.series.push({label: cmp.labels[k], stroke: PALETTE[k % PALETTE.length], width: 2, points: {show: false},
                        value: log2Value});
    });
    opts.scales.y = {range: yRange(fmt, data.slice(1))};
    opts.plugins = [rangePlugin(fmt, [], null)];
    return new uPlot(opts, data, el);
  }

  function fitRange(columns, extra, minPad) {
    var lo = Infinity, hi = -Infinity;
    columns.concat(extra ? [extra] : []).forEach(function (col) {
      col.forEach(function (v) { if (v != null && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    });
    if (!isFinite(lo)) return [0, 1];
    var pad = Math.max(minPad, (hi - lo) * 0.05);
    return [Math.floor(lo - pad), Math.ceil(hi + pad)];
  }

  /* the quantized matmul inputs of a scaled case: x = layer 1..depth, one colour per input
     (gemm_in, gemm_w, grad_gemm_in), the dash says which statistic */
  function quantChart(el, c, kind) {
    var stats = c[kind] || {};
    var data = [range(c.depth, 1)];
    var yLabel = {q: "SQNR (dB)", qf: "fraction", qs: "log2 scale"}[kind];
    var opts = baseOpts(el, null, yLabel);
    var value = kind === "q" ? function (u, v) { return v == null ? "—" : v.toFixed(1) + " dB"; } :
      kind === "qf" ? pctValue : log2Value;
    Object.keys(stats).forEach(function (key) {
      var parts = key.split("."), tensor = parts[0], stat = parts[1];
      data.push(stats[key]);
      opts.series.push({label: tensor.replace(/_/g, " ") + " " + (QUANT_LABEL[stat] || stat),
                        stroke: QUANT_COLOURS[tensor] || "#000", dash: QUANT_DASH[stat],
                        width: stat === "floor" ? 1.2 : stat === "all" || stat === "max" || stat === "flushed" ? 2 : 1.5,
                        points: {show: false}, value: value});
    });
    var series = data.slice(1);
    var empty = allNull(series) ? "no finite value to draw" : null;
    if (kind === "qf") {
      var top = 2 * c.thr;
      series.forEach(function (col) { col.forEach(function (v) { if (v != null) top = Math.max(top, 1.15 * v); }); });
      opts.scales.y = {range: [0, Math.min(1, top)]};
      opts.axes[1].values = function (u, vals) { return vals.map(function (v) { return +(100 * v).toPrecision(3) + "%"; }); };
    } else if (kind === "qs") {
      var band = c.qband;
      opts.scales.y = {range: fitRange(series, band ? [band.lo, band.hi] : null, 2)};
    } else {
      opts.scales.y = {range: fitRange(series, null, 2)};
    }
    opts.plugins = [{hooks: {drawClear: [function (u) {
      var ctx = u.ctx, b = u.bbox, px = uPlot.pxRatio;
      function line(v, colour, text, below) {
        var yy = u.valToPos(v, "y", true);
        if (yy < b.top || yy > b.top + b.height) return;
        ctx.strokeStyle = colour; ctx.lineWidth = px; ctx.setLineDash([4 * px, 3 * px]);
        ctx.beginPath(); ctx.moveTo(b.left, yy); ctx.lineTo(b.left + b.width, yy); ctx.stroke();
        ctx.fillStyle = colour; ctx.font = (11 * px) + "px system-ui, sans-serif"; ctx.textAlign = "right";
        ctx.fillText(text, b.left + b.width - 4 * px, below ? yy + 12 * px : yy - 3 * px);
      }
      ctx.save();
      if (kind === "qf") line(c.thr, "#777", "first_flush threshold " + (100 * c.thr) + "%", false);
      if (kind === "qs" && c.qband) {
        var top = u.valToPos(c.qband.hi, "y", true), bottom = u.valToPos(c.qband.lo, "y", true);
        ctx.fillStyle = "rgba(214, 39, 40, 0.10)";
        if (top > b.top) ctx.fillRect(b.left, b.top, b.width, top - b.top);
        if (bottom < b.top + b.height) ctx.fillRect(b.left, bottom, b.width, b.top + b.height - bottom);
        line(c.qband.hi, "#d62728", c.qband.hi_label + " (2^" + (+c.qband.hi.toFixed(2)) + ")", true);
        line(c.qband.lo, "#d62728", c.qband.lo_label + " (2^" + (+c.qband.lo.toFixed(2)) + ")", false);
      }
      if (empty) {
        ctx.fillStyle = "#444"; ctx.textAlign = "center"; ctx.font = (13 * px) + "px system-ui, sans-serif";
        ctx.fillText(empty, b.left + b.width / 2, b.top + b.height / 2);
      }
      ctx.restore();
    }]}}];
    return new uPlot(opts, data, el);
  }

  /* one line per recipe: the bulk SQNR of gemm_in over depth, on the group's shared scale */
  function recipeChart(el, cmp) {
    var depth = 0;
    cmp.cases.forEach(function (i) { depth = Math.max(depth, DATA.cases[i].depth); });
    var data = [range(depth, 1)];
    var opts = baseOpts(el, null, "bulk SQNR (dB)");
    cmp.cases.forEach(function (i, k) {
      var values = ((DATA.cases[i].q || {})["gemm_in.bulk"] || []).slice();
      while (values.length < depth) values.push(null);
      data.push(values);
      opts.series.push({label: cmp.labels[k], stroke: PALETTE[cmp.colours[k] % PALETTE.length], width: 2,
                        points: {show: false}, value: function (u, v) { return v == null ? "—" : v.toFixed(1) + " dB"; }});
    });
    opts.scales.y = {range: cmp.yrange};
    return new uPlot(opts, data, el);
  }

  function draw(el) {
    if (el.dataset.drawn) return;
    el.dataset.drawn = "1";
    var u;
    if (el.dataset.compare != null) {
      u = compareChart(el, DATA.comparisons[+el.dataset.compare]);
    } else if (el.dataset.recipes != null) {
      u = recipeChart(el, DATA.recipes[+el.dataset.recipes]);
    } else {
      var c = DATA.cases[+el.dataset.case], kind = el.dataset.kind;
      u = kind === "f" || kind === "b" ? rangeChart(el, c, kind) :
        kind === "q" || kind === "qf" || kind === "qs" ? quantChart(el, c, kind) : fractionChart(el, c, kind);
    }
    charts.push([u, el]);
    drawn++;
  }

  var observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (e) {
      if (e.isIntersecting) { observer.unobserve(e.target); draw(e.target); }
    });
  }, {rootMargin: "300px"}) : null;
  document.querySelectorAll(".chart").forEach(function (el) {
    if (observer) observer.observe(el); else draw(el);
  });

  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      charts.forEach(function (p) { p[0].setSize({width: Math.max(280, p[1].clientWidth), height: HEIGHT}); });
    }, 150);
  });

  /* filter: every whitespace-separated word must occur in the case id */
  var filterInput = document.getElementById("filter");
  var onlyFailing = document.getElementById("only-failing");
  var count = document.getElementById("filter-count");
  var sections = document.querySelectorAll("details.case");
  var cells = document.querySelectorAll("td.cell[data-id]");
  function matches(el, words, failing) {
    var id = el.dataset.id.toLowerCase();
    if (failing && el.dataset.failing !== "yes") return false;
    for (var i = 0; i < words.length; i++) if (id.indexOf(words[i]) < 0) return false;
    return true;
  }
  function applyFilter() {
    var words = filterInput.value.toLowerCase().split(/\s+/).filter(Boolean);
    var failing = onlyFailing.checked, shown = 0;
    sections.forEach(function (el) {
      var ok = matches(el, words, failing);
      el.hidden = !ok;
      if (ok) shown++;
    });
    cells.forEach(function (el) { el.classList.toggle("dim", !matches(el, words, failing)); });
    count.textContent = words.length || failing ? "showing " + shown + " of " + sections.length + " cases" : "";
  }
  filterInput.addEventListener("input", applyFilter);
  onlyFailing.addEventListener("change", applyFilter);

  /* a link to a case opens its section */
  function openFromHash() {
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id && document.getElementById(id);
    if (el && el.tagName === "DETAILS") {
      el.hidden = false;
      el.open = true;
      el.scrollIntoView();
    }
  }
  window.addEventListener("hashchange", openFromHash);
  openFromHash();
  document.getElementById("open-failing").addEventListener("click", function () {
    sections.forEach(function (el) { if (!el.hidden && el.dataset.failing === "yes") el.open = true; });
  });
  document.getElementById("close-all").addEventListener("click", function () {
    sections.forEach(function (el) { el.open = false; });
  });

  window.precisionReport = {
    readyMs: performance.now(),
    chartsDrawn: function () { return drawn; }
  };
})();
