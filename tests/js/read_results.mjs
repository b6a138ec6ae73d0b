// Reads pacsai's SEG and SR with dcmjs the way OHIF 3.x does, and prints what a viewer would get as JSON.
//
//   node read_results.mjs [--seg SEG.dcm --source SRC.dcm...] [--sr SR.dcm]
//
// SEG: the source images become a Cornerstone-style image stack (imageIds + a metadata provider) and the SEG goes
// through dcmjs.adapters.Cornerstone.Segmentation.generateToolState, the loader OHIF's SEG extension was built on:
// each SEG frame is matched to its source image by DerivationImageSequence > SourceImageSequence
// (ReferencedSOPInstanceUID), else by position. SR: the dataset is naturalized as OHIF's metadata store does, then
// read with the same access pattern as OHIF's cornerstone-dicom-sr SOP class handler (Image Library, then the
// Imaging Measurements' groups by Tracking Unique Identifier, each NUM's value and units); any missing container
// throws, as it does there. Every console.warn is collected: the test wants none.
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const warnings = [];
console.warn = (...args) => warnings.push(args.map(String).join(" "));
console.log = console.warn; // dcmjs logs through console too; stdout stays JSON only

const CODES = {
  report: "126000", // Imaging Measurement Report
  imageLibrary: "111028",
  imageLibraryGroup: "126200",
  imagingMeasurements: "126010",
  measurementGroup: "125007",
  trackingUid: "112040",
  trackingId: "112039",
};

function naturalize(path, untilPixels = false) {
  const bytes = readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const options = untilPixels ? { untilTag: "7FE00010", includeUntilTagValue: false } : {};
  const message = DicomMessage.readFile(buffer, options);
  const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(message.meta);
  return { buffer, dataset };
}

const asArray = (value) => (value === undefined || value === null ? [] : Array.isArray(value) ? value : [value]);
const code = (item) => asArray(item.ConceptNameCodeSequence)[0]?.CodeValue;

function stackOf(sourcePaths) {
  const instances = sourcePaths.map((path) => naturalize(path, true).dataset);
  instances.sort((a, b) => Number(a.InstanceNumber) - Number(b.InstanceNumber));
  const imageIds = instances.map((_, index) => `pacsai:${index}`);
  const modules = {
    instance: (ds) => ds,
    sopCommonModule: (ds) => ({ sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID }),
    generalSeriesModule: (ds) => ({ seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality }),
    imagePixelModule: (ds) => ({ rows: ds.Rows, columns: ds.Columns }),
    imagePlaneModule: (ds) => ({
      rows: ds.Rows,
      columns: ds.Columns,
      rowCosines: ds.ImageOrientationPatient.slice(0, 3).map(Number),
      columnCosines: ds.ImageOrientationPatient.slice(3, 6).map(Number),
      imagePositionPatient: ds.ImagePositionPatient.map(Number),
      frameOfReferenceUID: ds.FrameOfReferenceUID,
    }),
    frameNumber: () => undefined,
  };
  const metadataProvider = {
    get(type, imageId) {
      const ds = instances[imageIds.indexOf(imageId)];
      return ds === undefined || modules[type] === undefined ? undefined : modules[type](ds);
    },
  };
  return { instances, imageIds, metadataProvider };
}

function readSeg(segPath, sourcePaths) {
  const { buffer, dataset: seg } = naturalize(segPath);
  const { instances, imageIds, metadataProvider } = stackOf(sourcePaths);
  const bySop = new Set(instances.map((ds) => ds.SOPInstanceUID));
  const frames = asArray(seg.PerFrameFunctionalGroupsSequence);
  const referenced = frames.map((group) => {
    const derivation = asArray(group.DerivationImageSequence)[0];
    return asArray(derivation?.SourceImageSequence)[0]?.ReferencedSOPInstanceUID;
  });
  const state = dcmjs.adapters.Cornerstone.Segmentation.generateToolState(imageIds, buffer, metadataProvider);
  const voxels = {};
  for (const labelmap of state.labelmapBufferArray) {
    for (const value of new Uint16Array(labelmap)) {
      if (value) voxels[value] = (voxels[value] ?? 0) + 1;
    }
  }
  return {
    frames: frames.length,
    framesOnSourceImages: referenced.filter((uid) => bySop.has(uid)).length,
    imagesWithSegments: state.segmentsOnFrame.filter((segments) => segments?.length).length,
    segments: asArray(seg.SegmentSequence).map((s) => ({ number: s.SegmentNumber, label: s.SegmentLabel })),
    voxels,
  };
}

function measurementOf(items) {
  const trackingUid = items.find((item) => code(item) === CODES.trackingUid);
  const trackingId = items.find((item) => code(item) === CODES.trackingId);
  const values = items
    .filter((item) => item.ValueType === "NUM")
    .map((item) => {
      void item.ContentSequence.ValueType; // OHIF reads this; it throws on a NUM without content items
      const measured = asArray(item.MeasuredValueSequence)[0];
      return {
        name: asArray(item.ConceptNameCodeSequence)[0].CodeMeaning,
        value: Number(measured.NumericValue),
        units: asArray(measured.MeasurementUnitsCodeSequence)[0].CodeValue,
      };
    });
  return { trackingUid: trackingUid.UID, trackingId: trackingId.TextValue, values };
}

function readSr(srPath) {
  const { dataset: sr } = naturalize(srPath);
  if (code(sr) !== CODES.report) throw new Error("not a TID 1500 Imaging Measurement Report");
  const content = asArray(sr.ContentSequence);
  const library = content.find((item) => code(item) === CODES.imageLibrary);
  const libraryGroup = asArray(library.ContentSequence).find((item) => code(item) === CODES.imageLibraryGroup);
  const referencedImages = asArray(libraryGroup?.ContentSequence)
    .flatMap((item) => asArray(item.ReferencedSOPSequence))
    .filter((ref) => ref.ReferencedSOPClassUID)
    .map((ref) => ref.ReferencedSOPInstanceUID);
  const measurements = content.find((item) => code(item) === CODES.imagingMeasurements);
  const groups = asArray(measurements.ContentSequence).filter((item) => code(item) === CODES.measurementGroup);
  return {
    template: asArray(sr.ContentTemplateSequence)[0]?.TemplateIdentifier,
    referencedImages,
    measurements: groups.map((group) => measurementOf(asArray(group.ContentSequence))),
  };
}

function parse(argv) {
  const args = { seg: undefined, sr: undefined, source: [] };
  for (let i = 0; i < argv.length; i += 1) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === "--seg" || flag === "--sr") [args[flag.slice(2)], i] = [value, i + 1];
    else if (flag === "--source") [args.source, i] = [[...args.source, value], i + 1];
    else throw new Error(`unknown argument ${flag}`);
  }
  return args;
}

const args = parse(process.argv.slice(2));
const version = JSON.parse(readFileSync(new URL("./node_modules/dcmjs/package.json", import.meta.url))).version;
const result = { dcmjs: version };
if (args.seg) result.seg = readSeg(args.seg, args.source);
if (args.sr) result.sr = readSr(args.sr);
result.warnings = warnings;
process.stdout.write(JSON.stringify(result));
