// Ranking by drag and drop or keyboard; keeps the rank_<id> selects (what the form submits) in step.
(function () {
  "use strict";
  var list = document.getElementById("ranking");
  if (!list) { return; }
  var form = document.getElementById("label-form");
  function items() { return Array.prototype.slice.call(list.querySelectorAll("li.candidate")); }
  function renumber() {
    items().forEach(function (li, i) {
      li.querySelector(".pos").textContent = "#" + (i + 1);
      li.querySelector("select.rank").value = String(i + 1);
    });
  }
  function moveTo(li, index) {
    var all = items().filter(function (x) { return x !== li; });
    index = Math.max(0, Math.min(index, all.length));
    list.insertBefore(li, all[index] || null);
    renumber();
    li.focus();
  }
  var dragged = null;
  list.addEventListener("dragstart", function (e) {
    dragged = e.target.closest("li.candidate");
    if (dragged) { dragged.classList.add("dragging"); e.dataTransfer.effectAllowed = "move"; }
  });
  list.addEventListener("dragend", function () {
    if (dragged) { dragged.classList.remove("dragging"); dragged = null; renumber(); }
  });
  list.addEventListener("dragover", function (e) {
    if (!dragged) { return; }
    e.preventDefault();
    var over = e.target.closest("li.candidate");
    if (!over || over === dragged) { return; }
    var box = over.getBoundingClientRect();
    list.insertBefore(dragged, e.clientY < box.top + box.height / 2 ? over : over.nextSibling);
  });
  list.addEventListener("drop", function (e) { e.preventDefault(); renumber(); });
  // A rank chosen in a select moves the card there.
  list.addEventListener("change", function (e) {
    if (e.target.matches("select.rank")) { moveTo(e.target.closest("li"), parseInt(e.target.value, 10) - 1); }
  });
  list.addEventListener("keydown", function (e) {
    var li = e.target;
    if (!li.matches || !li.matches("li.candidate")) { return; }
    var i = items().indexOf(li);
    if (e.altKey && e.key === "ArrowUp") { e.preventDefault(); moveTo(li, i - 1); }
    else if (e.altKey && e.key === "ArrowDown") { e.preventDefault(); moveTo(li, i + 1); }
    else if (e.key === "ArrowUp" && i > 0) { e.preventDefault(); items()[i - 1].focus(); }
    else if (e.key === "ArrowDown" && i < items().length - 1) { e.preventDefault(); items()[i + 1].focus(); }
    else if (/^[1-9]$/.test(e.key) && parseInt(e.key, 10) <= items().length) { e.preventDefault(); moveTo(li, parseInt(e.key, 10) - 1); }
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); document.getElementById("submit").click(); }
  });
  renumber();
  if (form) { items()[0].focus(); }
})();
