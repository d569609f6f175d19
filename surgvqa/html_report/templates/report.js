"use strict";
(function () {
  // Embedded thumbnails live once per distinct frame in a JSON store; each card names its own frames, so a
  // card can only ever show the frames listed inside that card.
  var storeEl = document.getElementById("frame-store");
  var store = storeEl ? JSON.parse(storeEl.textContent) : {};
  var audioEl = document.getElementById("audio-store");
  var audioStore = audioEl ? JSON.parse(audioEl.textContent) : {};
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));

  function fillCard(card) {
    if (card.dataset.filled) return;
    card.dataset.filled = "1";
    card.querySelectorAll("img[data-frame]").forEach(function (img) {
      var src = store[img.dataset.frame];
      if (src) img.src = src;
    });
    card.querySelectorAll("audio[data-audio]").forEach(function (au) {
      var src = audioStore[au.dataset.audio];
      if (src) au.src = src;
    });
  }
  if ("IntersectionObserver" in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { fillCard(e.target); io.unobserve(e.target); }
      });
    }, { rootMargin: "600px 0px" });
    cards.forEach(function (c) { io.observe(c); });
  } else {
    cards.forEach(fillCard);
  }

  // ---- flipbook: cycles through the frames of the card that was clicked
  var timers = new WeakMap();
  function frameImgs(card) { return Array.prototype.slice.call(card.querySelectorAll(".strip figure")); }
  function showFrame(card, i) {
    var figs = frameImgs(card);
    if (!figs.length) return;
    i = (i + figs.length) % figs.length;
    card.dataset.frameIndex = String(i);
    figs.forEach(function (f, j) { f.classList.toggle("on", j === i); });
    var big = card.querySelector(".flip img");
    var cap = card.querySelector(".flip .fc");
    var img = figs[i].querySelector("img");
    if (big) { big.src = img && img.src ? img.src : ""; big.alt = figs[i].dataset.name || ""; }
    if (cap) cap.textContent = (i + 1) + " / " + figs.length + "  " + (figs[i].dataset.name || "");
  }
  function stop(card) {
    var t = timers.get(card);
    if (t) { clearInterval(t); timers.delete(card); }
    card.classList.remove("playing");
  }
  function toggleFlip(card, startAt) {
    var flip = card.querySelector(".flip");
    if (!flip || !frameImgs(card).length) return;
    fillCard(card);
    if (timers.get(card)) { stop(card); return; }
    flip.classList.add("open");
    var i = startAt !== undefined ? startAt : parseInt(card.dataset.frameIndex || "0", 10);
    showFrame(card, i);
    card.classList.add("playing");
    timers.set(card, setInterval(function () {
      showFrame(card, parseInt(card.dataset.frameIndex || "0", 10) + 1);
    }, 250));
  }
  cards.forEach(function (card) {
    var strip = card.querySelector(".strip");
    if (!strip) return;
    strip.addEventListener("click", function (ev) {
      var fig = ev.target.closest("figure");
      var figs = frameImgs(card);
      toggleFlip(card, fig ? figs.indexOf(fig) : 0);
    });
  });

  // ---- filters
  var typeSel = document.getElementById("f-type");
  var wrongBox = document.getElementById("f-wrong");
  var disBox = document.getElementById("f-disagree");
  var search = document.getElementById("f-search");
  var countEl = document.getElementById("f-count");
  var visible = cards.slice();
  var current = -1;

  function applyFilters() {
    var t = typeSel ? typeSel.value : "";
    var wrong = wrongBox && wrongBox.checked;
    var dis = disBox && disBox.checked;
    var q = search ? search.value.trim().toLowerCase() : "";
    visible = [];
    cards.forEach(function (c) {
      var show = (!t || c.dataset.type === t) && (!wrong || c.dataset.correct === "0") &&
        (!dis || c.dataset.disagree === "1");
      if (show && q) {
        var key = (c.dataset.videoId + "/" + c.dataset.id).toLowerCase();
        show = key.indexOf(q) !== -1;
      }
      c.hidden = !show;
      if (show) visible.push(c);
      else stop(c);
    });
    if (countEl) countEl.textContent = "showing " + visible.length + " of " + cards.length;
    if (current >= 0 && cards[current] && cards[current].hidden) setCurrent(-1);
  }
  [typeSel, wrongBox, disBox].forEach(function (el) { if (el) el.addEventListener("change", applyFilters); });
  if (search) search.addEventListener("input", applyFilters);

  // ---- keyboard navigation
  function setCurrent(i) {
    if (current >= 0 && cards[current]) cards[current].classList.remove("current");
    current = i;
    if (i >= 0) {
      var c = cards[i];
      c.classList.add("current");
      fillCard(c);
      c.scrollIntoView({ block: "nearest" });
    }
  }
  function step(d) {
    if (!visible.length) return;
    var pos = current >= 0 ? visible.indexOf(cards[current]) : -1;
    var next = pos < 0 ? (d > 0 ? 0 : visible.length - 1) : Math.min(visible.length - 1, Math.max(0, pos + d));
    setCurrent(cards.indexOf(visible[next]));
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.target === search) {
      if (ev.key === "Escape" || ev.key === "Enter") search.blur();
      return;
    }
    var tag = ev.target && ev.target.tagName;
    var box = tag === "INPUT" && ev.target.type === "checkbox";
    if ((tag === "INPUT" && !box) || tag === "SELECT" || tag === "TEXTAREA") return;
    if (ev.altKey || ev.ctrlKey || ev.metaKey || (box && ev.key === " ")) return;
    if (ev.key === "j" || ev.key === "ArrowRight") { step(1); ev.preventDefault(); }
    else if (ev.key === "k" || ev.key === "ArrowLeft") { step(-1); ev.preventDefault(); }
    else if (ev.key === " " && current >= 0) { toggleFlip(cards[current]); ev.preventDefault(); }
    else if (ev.key === "w" && wrongBox) { wrongBox.checked = !wrongBox.checked; applyFilters(); }
    else if (ev.key === "d" && disBox && !disBox.disabled) { disBox.checked = !disBox.checked; applyFilters(); }
    else if (ev.key === "/" && search) { search.focus(); ev.preventDefault(); }
    else if (ev.key === "Escape" && current >= 0) { stop(cards[current]); }
  });
  cards.forEach(function (c, i) {
    c.addEventListener("click", function () { if (current !== i) setCurrent(i); });
  });
  applyFilters();
})();
