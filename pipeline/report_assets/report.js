// vidlens report: marks the page once every image has loaded (or failed), so a person or a
// test can tell at a glance whether the thumbnails are all there.
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.dataset.imagesLoaded = loaded.length + "/" + images.length;
});
