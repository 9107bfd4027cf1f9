// The ranking control of alignkit label: drag letters into places, or number keys on a focused
// letter / response. The <select name="rank_N"> of each response holds the value the form submits;
// this script only moves the letters to match it. It never writes HTML (textContent only): the page
// shows untrusted model output, and the Content-Security-Policy allows no inline script anyway.
"use strict";

(function () {
  const form = document.getElementById("label-form");
  if (!form) return;
  const k = Number(form.dataset.k);
  const board = document.getElementById("board");
  const selects = Array.from(form.querySelectorAll("select.rank-select"));
  const letters = "ABCDEFGHI";

  const chip = (pos) => board.querySelector('.chip[data-pos="' + pos + '"]');
  const slot = (rank) => board.querySelector('.slot[data-rank="' + rank + '"]');

  function summarise() {
    const byPlace = {};
    const unranked = [];
    selects.forEach((s, pos) => {
      if (s.value) (byPlace[s.value] = byPlace[s.value] || []).push(letters[pos]);
      else unranked.push(letters[pos]);
    });
    const places = Object.keys(byPlace).sort((a, b) => a - b).map((p) => byPlace[p].join(" = "));
    let text = places.length ? "Ranking: " + places.join(" > ") : "Not ranked yet";
    if (places.length && unranked.length) text += "; unranked: " + unranked.join(", ");
    document.getElementById("rank-summary").textContent = text;
  }

  function place(pos) {
    const c = chip(pos);
    const target = slot(selects[pos].value) || slot("");
    const hadFocus = document.activeElement === c;
    target.querySelector(".chips").appendChild(c);
    if (hadFocus) c.focus();  // moving a node drops its focus; keyboard users keep their place
  }

  function setRank(pos, value) {
    selects[pos].value = value;
    place(pos);
    summarise();
  }

  selects.forEach((s, pos) => s.addEventListener("change", () => { place(pos); summarise(); }));

  // mouse: HTML5 drag and drop of a letter onto a place (or back to "unranked")
  board.addEventListener("dragstart", (e) => {
    const c = e.target.closest(".chip");
    if (!c) return;
    e.dataTransfer.setData("text/plain", c.dataset.pos);
    e.dataTransfer.effectAllowed = "move";
    c.classList.add("dragging");
  });
  board.addEventListener("dragend", (e) => {
    const c = e.target.closest(".chip");
    if (c) c.classList.remove("dragging");
  });
  board.addEventListener("dragover", (e) => {
    if (e.target.closest(".slot")) e.preventDefault();
  });
  board.addEventListener("drop", (e) => {
    const s = e.target.closest(".slot");
    if (!s) return;
    e.preventDefault();
    const pos = Number(e.dataTransfer.getData("text/plain"));
    if (Number.isInteger(pos) && pos >= 0 && pos < selects.length) setRank(pos, s.dataset.rank);
  });

  // keyboard: digits on a focused letter or response set its place; in the quality scale, its score
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      form.requestSubmit(document.getElementById("submit"));
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (!(t instanceof Element) || t.matches("textarea, input[type=text], select")) return;
    const holder = t.closest("[data-pos]");
    if (!holder) return;
    const pos = Number(holder.dataset.pos);
    const digit = /^[0-9]$/.test(e.key) ? Number(e.key) : null;
    if (t.closest(".overall")) {
      const radio = digit !== null && document.getElementById("overall-" + pos + "-" + digit);
      if (radio) { radio.checked = true; radio.focus(); e.preventDefault(); }
      return;
    }
    if (digit !== null && digit >= 1 && digit <= k) {
      setRank(pos, String(digit));
      e.preventDefault();
    } else if (digit === 0 || e.key === "Backspace" || e.key === "Delete") {
      setRank(pos, "");
      e.preventDefault();
    }
  });

  summarise();
})();
