"""Annotation readers on tiny files in each exact format (CLIP4Clip layouts, WebVid, video2dataset, JSONL)."""

from __future__ import annotations

import collections
import gzip
import io
import json
import pickle
import tarfile

import pytest

from stoa_vlp.data.annotations import (
    AnnotationError,
    VideoRecord,
    detect_format,
    read_annotations,
    shard_video_id,
    split_member_name,
)


def touch_videos(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


MSRVTT_DATA = {
    "info": {"year": 2016},
    "videos": [
        {"category": 9, "url": "u", "video_id": "video0", "start time": 1.0, "end time": 9.0, "split": "train", "id": 0},
        {"category": 3, "url": "u", "video_id": "video1", "start time": 2.0, "end time": 8.0, "split": "train", "id": 1},
        {"category": 1, "url": "u", "video_id": "video2", "start time": 0.0, "end time": 5.0, "split": "validate", "id": 2},
        {"category": 2, "url": "u", "video_id": "video3", "start time": 0.0, "end time": 5.0, "split": "test", "id": 3},
    ],
    "sentences": [
        {"caption": "a man drives a car", "video_id": "video0", "sen_id": 0},
        {"caption": "a car on a road", "video_id": "video0", "sen_id": 1},
        {"caption": "a dog  runs", "video_id": "video1", "sen_id": 2},
        {"caption": "", "video_id": "video1", "sen_id": 3},
        {"caption": "people talk", "video_id": "video2", "sen_id": 4},
        {"caption": "a cat sleeps", "video_id": "video3", "sen_id": 5},
    ],
}


def test_msrvtt_json_splits_and_video_lookup(tmp_path):
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(MSRVTT_DATA))
    touch_videos(tmp_path / "videos" / "sub", ["video0.mp4", "video1.mp4", "video2.mp4"])
    train = read_annotations(tmp_path / "MSRVTT_data.json", split="train")
    assert [r.video_id for r in train] == ["video0", "video1"]
    assert train[0].captions == ["a man drives a car", "a car on a road"]
    assert train[1].captions == ["a dog runs"]  # whitespace normalised, empty caption dropped
    assert train[0].path == str(tmp_path / "videos" / "sub" / "video0.mp4")
    assert [r.video_id for r in read_annotations(tmp_path / "MSRVTT_data.json", split="val")] == ["video2"]
    test = read_annotations(tmp_path / "MSRVTT_data.json", split="test", video_root=tmp_path / "elsewhere")
    assert test[0].path == str(tmp_path / "elsewhere" / "video3.mp4")  # not found: expected place
    with pytest.raises(AnnotationError, match="needs split"):
        read_annotations(tmp_path / "MSRVTT_data.json")
    with pytest.raises(AnnotationError, match=r"sentences\[3\]: empty caption"):
        read_annotations(tmp_path / "MSRVTT_data.json", split="train", strict=True)


def test_captions_only_reads_look_for_no_video(tmp_path, caplog):
    # raw and prepared copies of one video beside the file: an ambiguous id for a read that finds videos
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(MSRVTT_DATA))
    touch_videos(tmp_path / "raw_videos", ["video0.mp4"])
    touch_videos(tmp_path / "prepared" / "videos", ["video0.mp4"])
    with pytest.raises(AnnotationError, match="MSRVTT_data.json: video 'video0' is ambiguous"):
        read_annotations(tmp_path / "MSRVTT_data.json", split="train")
    records = read_annotations(tmp_path / "MSRVTT_data.json", split="train", captions_only=True)
    assert [(r.video_id, r.path, r.captions) for r in records] == [
        ("video0", "", ["a man drives a car", "a car on a road"]), ("video1", "", ["a dog runs"])]
    assert "not found" not in caplog.text  # video1 has no file, and is not looked for


def test_a_video_without_captions_is_left_out_of_training_and_refused_in_evaluation(tmp_path, caplog):
    # before, evaluation (strict) left it out of the candidates too, raising the recalls
    data = json.loads(json.dumps(MSRVTT_DATA))
    data["videos"].append({"category": 2, "url": "u", "video_id": "video4", "start time": 0.0, "end time": 5.0,
                           "split": "test", "id": 4})
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    assert [r.video_id for r in read_annotations(tmp_path / "MSRVTT_data.json", split="test")] == ["video3"]
    assert "1 videos have no caption and are left out (e.g. video4)" in caplog.text
    with pytest.raises(AnnotationError, match="MSRVTT_data.json: 1 videos have no caption \\(e.g. video4\\)"):
        read_annotations(tmp_path / "MSRVTT_data.json", split="test", strict=True)
    # the empty caption of a training video is not the validation split's problem
    assert [r.video_id for r in read_annotations(tmp_path / "MSRVTT_data.json", split="val", strict=True)] == ["video2"]


def test_msrvtt_9k_csv_and_jsfusion_test(tmp_path, caplog):
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(MSRVTT_DATA))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo0\n")
    with caplog.at_level("INFO", logger="stoa_vlp.data.annotations"):
        records = read_annotations(tmp_path / "MSRVTT_train.9k.csv")
    assert [(r.video_id, len(r.captions)) for r in records] == [("video1", 1), ("video0", 2)]
    assert f"{tmp_path / 'MSRVTT_train.9k.csv'} (msrvtt): 2 videos, 3 captions" in caplog.text  # the counts, said
    caplog.clear()
    with caplog.at_level("INFO", logger="stoa_vlp.data.annotations"):
        read_annotations(tmp_path / "MSRVTT_train.9k.csv")
    assert "2 videos, 3 captions" not in caplog.text  # once per file and split
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr7579,video7579,a girl wearing red top and black trouser is putting a sweater on a dog\n"
        "ret1,msr7725,video7725,young people sit around the edges of a room clapping\n"
    )
    test = read_annotations(tmp_path / "MSRVTT_JSFUSION_test.csv")
    assert [r.video_id for r in test] == ["video7579", "video7725"]
    assert test[1].captions == ["young people sit around the edges of a room clapping"]
    (tmp_path / "MSRVTT_bad.csv").write_text("vid,sentence\nvideo1,x\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_bad.csv:1: missing column\(s\) video_id"):
        read_annotations(tmp_path / "MSRVTT_bad.csv")


def test_msvd_pickle_and_split_lists(tmp_path):
    captions = {
        "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating"], ["a", "chipmunk", "eats"]],
        "-7KMZQEsJW4_205_208": [["a", "woman", "is", "slicing"]],
    }
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    (tmp_path / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n")
    (tmp_path / "test_list.txt").write_text("-7KMZQEsJW4_205_208\n")
    touch_videos(tmp_path / "YouTubeClips", ["-4wsuPCjDBc_5_15.avi"])
    train = read_annotations(tmp_path / "raw-captions.pkl", split="train", video_root=tmp_path / "YouTubeClips")
    assert train == [
        VideoRecord("-4wsuPCjDBc_5_15", str(tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi"), None, None,
                    ["a squirrel is eating", "a chipmunk eats"])
    ]
    assert read_annotations(tmp_path / "raw-captions.pkl", split="test")[0].captions == ["a woman is slicing"]
    with pytest.raises(AnnotationError, match="val_list.txt: split list not found"):
        read_annotations(tmp_path / "raw-captions.pkl", split="val")


DIDEMO = [
    {"video": "v1.mp4", "times": [[0, 0], [0, 1], [1, 1]], "description": "a man opens a door", "annotation_id": 1},
    {"video": "v1.mp4", "times": [[3, 4], [3, 4]], "description": "the man walks out", "annotation_id": 2},
    {"video": "v2.mp4", "times": [[2, 2]], "description": "a red car", "annotation_id": 3},
    {"video": "v3.mp4", "times": [[0, 0]], "description": "not in the split list", "annotation_id": 4},
]


def test_didemo_paragraph_and_moments(tmp_path):
    (tmp_path / "test_data.json").write_text(json.dumps(DIDEMO))
    (tmp_path / "test_list.txt").write_text("v1.mp4\nv2.mp4\n")
    touch_videos(tmp_path / "videos", ["v1.mp4", "v2.mp4"])
    paragraphs = read_annotations(tmp_path / "test_data.json")
    assert [(r.video_id, r.captions, r.start, r.end) for r in paragraphs] == [
        ("v1.mp4", ["a man opens a door the man walks out"], 0.0, 30.0),
        ("v2.mp4", ["a red car"], 0.0, 30.0),
    ]
    assert paragraphs[0].path == str(tmp_path / "videos" / "v1.mp4")
    moments = read_annotations(tmp_path / "test_data.json", format="didemo-moments")
    # annotators' mean segment indices times 5 s: start mean(0,0,1)*5, end (mean(0,1,1)+1)*5
    assert moments[0].start == pytest.approx(5 / 3) and moments[0].end == pytest.approx(5 * (2 / 3 + 1))
    assert (moments[1].start, moments[1].end) == (15.0, 25.0)
    assert len(moments) == 3
    (tmp_path / "bad_data.json").write_text('[{"video": "v1.mp4",\n "times": [[0, 0]]\n "description": "x"}]')
    with pytest.raises(AnnotationError, match="bad_data.json:3: malformed JSON"):
        read_annotations(tmp_path / "bad_data.json")


def test_lsmdc_tab_separated(tmp_path):
    lines = [
        "0001_American_Beauty_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\tSOMEONE looks up.",
        "0001_American_Beauty_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\tHe smiles.",
        "0002_Other_00.01.00.000-00.01.02.000\t00.01.00.000\t00.01.02.000\t00.01.00.000\t00.01.02.000\tShe waves.",
    ]
    path = tmp_path / "LSMDC16_annos_training.csv"
    path.write_text("\n".join(lines) + "\n")
    touch_videos(tmp_path / "avi" / "0001_American_Beauty", ["0001_American_Beauty_00.00.51.926-00.00.54.129.avi"])
    records = read_annotations(path, video_root=tmp_path / "avi")
    assert [(r.video_id, r.captions) for r in records] == [
        ("0001_American_Beauty_00.00.51.926-00.00.54.129", ["SOMEONE looks up.", "He smiles."]),
        ("0002_Other_00.01.00.000-00.01.02.000", ["She waves."]),
    ]
    assert records[0].path.endswith("0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi")
    path.write_text(lines[0] + "\n" + "clip\tonly three\tfields\n")
    with pytest.raises(AnnotationError, match="LSMDC16_annos_training.csv:2: expected 6 tab-separated fields, got 3"):
        read_annotations(path)


def test_webvid_csv(tmp_path):
    path = tmp_path / "results_2M_train.csv"
    path.write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "21179416,https://x/1.mp4,PT00H00M11S,1066692,\"Aerial shot, winter forest\"\n"
        "5629492,https://x/2.mp4,PT00H00M29S,1084012,   \n"
    )
    records = read_annotations(path, video_root=tmp_path / "webvid")
    assert records == [
        VideoRecord("21179416", str(tmp_path / "webvid" / "1066692" / "21179416.mp4"), None, None,
                    ["Aerial shot, winter forest"])
    ]
    with pytest.raises(AnnotationError, match="results_2M_train.csv:3: empty caption"):
        read_annotations(path, strict=True)


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "000000000.mp4", b"video")
        add_member(archive, "000000000.txt", b"a dog on grass")
        add_member(archive, "000000000.json", json.dumps({"caption": "a dog on grass", "url": "u"}).encode())
        add_member(archive, "000000001.mp4", b"video")
        add_member(archive, "000000001.json", json.dumps({"caption": "snow falls", "key": "000000001"}).encode())
        add_member(archive, "000000002.txt", b"caption without video")
    records = read_annotations(shard)
    assert [(r.video_id, r.path, r.captions) for r in records] == [
        ("000000000", f"{shard}::000000000", ["a dog on grass"]),
        ("000000001", f"{shard}::000000001", ["snow falls"]),
    ]
    assert detect_format(tmp_path) == "webdataset"
    assert len(read_annotations(tmp_path)) == 2  # a folder of shards
    (tmp_path / "00001.tar").write_bytes(shard.read_bytes())
    assert len(read_annotations(tmp_path / "{00000..00001}.tar")) == 4  # a brace range
    (tmp_path / "train.shards").write_text("00000.tar\n00001.tar\n")
    assert len(read_annotations(tmp_path / "train.shards")) == 4  # a list file
    with pytest.raises(AnnotationError, match=r"1 of 3 shards do not exist \(e.g. .*00002.tar\)"):
        read_annotations(tmp_path / "{00000..00002}.tar")
    bad = tmp_path / "bad" / "00001.tar"
    bad.parent.mkdir()
    with tarfile.open(bad, "w") as archive:
        add_member(archive, "k.mp4", b"video")
        add_member(archive, "k.json", b"{not json")
    with pytest.raises(AnnotationError, match=r"00001.tar::k.json: malformed JSON"):
        read_annotations(bad)


def test_shard_member_names_split_as_webdataset_does():
    assert split_member_name("0001.mp4") == ("0001", "mp4")
    assert split_member_name("./0001.mp4") == ("0001", "mp4")  # `tar cf x.tar ./*`
    assert split_member_name("./part0/v1.2/0001.mp4") == ("part0/v1.2/0001", "mp4")  # first dot of the file name
    assert split_member_name("0001.meta.json") == ("0001", "meta.json")
    assert shard_video_id("part0/0001") == "0001" and shard_video_id("0001") == "0001"


def test_webdataset_captions_are_cleaned_and_txt_preferred(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "./part0/0001.json", json.dumps({"url": "u", "duration": 2.0}).encode())
        add_member(archive, "./part0/0001.mp4", b"video")
        add_member(archive, "./part0/0001.txt", b"a dog\truns \n")
    assert [(r.video_id, r.path, r.captions) for r in read_annotations(shard)] == [
        ("0001", f"{shard}::part0/0001", ["a dog runs"]),
    ]
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "0002.mp4", b"video")
        add_member(archive, "0002.txt", b"caf\xe9")
    with pytest.raises(AnnotationError, match=r"00000.tar::0002.txt: not UTF-8 text"):
        read_annotations(shard)


def test_generic_jsonl(tmp_path):
    touch_videos(tmp_path / "clips", ["a.mp4", "b.webm"])
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"video_id": "a", "video": "clips/a.mp4", "caption": "first"}) + "\n"
        + json.dumps({"video_id": "a", "video": "clips/a.mp4", "caption": "second"}) + "\n"
        + "\n"
        + json.dumps({"video_id": "b", "video": "b.webm", "caption": ["x", "y"], "start": 2.0}) + "\n"
    )
    records = read_annotations(path, video_root=tmp_path)
    assert records[0] == VideoRecord("a", str(tmp_path / "clips" / "a.mp4"), None, None, ["first", "second"])
    assert records[1] == VideoRecord("b", str(tmp_path / "clips" / "b.webm"), 2.0, None, ["x", "y"])
    path.write_text(json.dumps({"video_id": "a", "caption": "ok"}) + "\n" + '{"video_id": "b", "caption": \n')
    with pytest.raises(AnnotationError, match="train.jsonl:2: malformed JSON"):
        read_annotations(path)
    path.write_text(json.dumps({"video": "a.mp4", "caption": "no id"}) + "\n")
    with pytest.raises(AnnotationError, match="train.jsonl:1: needs video_id and caption"):
        read_annotations(path)


def test_gzip_compressed_text_is_read_as_the_text(tmp_path):
    touch_videos(tmp_path, ["a.mp4"])
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps({"video_id": "a", "video": "a.mp4", "caption": "caf\u00e9"}).encode() + b"\n"))
    assert read_annotations(path, "jsonl", video_root=tmp_path) == [VideoRecord("a", str(tmp_path / "a.mp4"), None, None, ["caf\u00e9"])]
    path.write_bytes(gzip.compress(b'{"video_id": "a", "video": "a.mp4", "caption": "ok"}\n{"video_id": "caf\xe9"}\n'))
    with pytest.raises(AnnotationError, match=r"train.jsonl.gz:2: not UTF-8 text"):
        read_annotations(path, "jsonl", video_root=tmp_path)


def test_jsonl_segments_of_one_video_are_records_of_their_own(tmp_path):
    touch_videos(tmp_path, ["a.mp4"])
    path = tmp_path / "moments.jsonl"
    lines = [
        {"video_id": "a", "caption": "a man opens a door", "start": 0, "end": 5},
        {"video_id": "a", "caption": "the man walks out", "start": 5, "end": 10},
        {"video_id": "a", "caption": "a door opens", "start": 0.0, "end": 5.0},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_annotations(path)
    assert [(r.video_id, r.start, r.end, r.captions) for r in records] == [
        ("a", 0, 5, ["a man opens a door", "a door opens"]),
        ("a", 5, 10, ["the man walks out"]),
    ]
    assert records[0].path == records[1].path == str(tmp_path / "a.mp4")
    path.write_text(json.dumps({"video_id": "a", "caption": "x", "start": "0:05"}) + "\n")
    with pytest.raises(AnnotationError, match="moments.jsonl:1: start must be a number of seconds or null"):
        read_annotations(path)


def test_format_is_told_by_an_unambiguous_extension_before_the_name(tmp_path):
    assert detect_format("msrvtt_train.jsonl") == "jsonl"
    assert detect_format("LSMDC_clips.jsonl") == "jsonl"
    assert detect_format("MSRVTT_train.9k.csv") == "msrvtt" and detect_format("results_2M_train.csv") == "webvid"
    touch_videos(tmp_path, ["video7.mp4"])
    path = tmp_path / "msrvtt_train.jsonl"
    path.write_text(json.dumps({"video_id": "video7", "caption": "a cat sleeps"}) + "\n")
    assert read_annotations(path) == [VideoRecord("video7", str(tmp_path / "video7.mp4"), None, None, ["a cat sleeps"])]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(AnnotationError, match="nothing.jsonl: annotation file does not exist"):
        read_annotations(tmp_path / "nothing.jsonl")
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(AnnotationError, match="cannot tell the annotation format"):
        read_annotations(tmp_path / "notes.xyz")


def write_annotation_files(folder, files: dict) -> None:
    """Each {name: content} as a file: bytes as they are, text as it is, .pkl pickled, .jsonl one JSON
    line per item, anything else as JSON."""
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        elif name.endswith(".pkl"):
            path.write_bytes(pickle.dumps(content))
        elif name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(line) + "\n" for line in content))
        else:
            path.write_text(json.dumps(content))


UNKNOWN_CLASS_PICKLE = pickle.dumps(collections.OrderedDict()).replace(b"collections", b"no_such_mod")


@pytest.mark.parametrize(
    "files,format,message",
    [
        ({"MSRVTT_data.json": {"videos": [], "sentences": 5}}, "auto", r"MSRVTT_data.json: sentences must be a list, got 5"),
        ({"MSRVTT_data.json": {"videos": 5, "sentences": []}}, "auto", r"MSRVTT_data.json: videos must be a list, got 5"),
        ({"MSRVTT_data.json": {"videos": ["video0"], "sentences": []}}, "auto", r"videos\[0\]: expected an object"),
        ({"MSRVTT_data.json": {"videos": [{"video_id": 0, "split": "train"}], "sentences": []}}, "auto",
         r"MSRVTT_data.json: videos\[0\]: video_id must be a non-empty string, got 0"),
        ({"MSRVTT_data.json": {"videos": [{"video_id": ["x"], "split": "train"}], "sentences": []}}, "auto",
         r"videos\[0\]: video_id must be a non-empty string, got \['x'\]"),
        ({"MSRVTT_data.json": {"videos": [{"split": "train"}], "sentences": []}}, "auto", r"videos\[0\]: video_id must be"),
        ({"MSRVTT_data.json": {"videos": [{"video_id": "video0", "split": 1}], "sentences": []}}, "auto",
         r"videos\[0\]: split must be a non-empty string, got 1"),
        ({"MSRVTT_data.json": {"videos": [], "sentences": [{"video_id": ["video0"], "caption": "a"}]}}, "auto",
         r"sentences\[0\]: video_id must be a non-empty string"),
        ({"raw-captions.pkl": ["video0"]}, "auto", r"raw-captions.pkl: expected a dict .* got list"),
        ({"raw-captions.pkl": {"video0": None}}, "auto", r"raw-captions.pkl: video0: captions must be a list, got None"),
        ({"raw-captions.pkl": {"video0": [[1, 2]]}}, "auto", r"raw-captions.pkl: video0\[0\]: words must be strings"),
        ({"raw-captions.pkl": {"video0": [["a", ["b"]]]}}, "auto", r"video0\[0\]: words must be strings"),
        ({"raw-captions.pkl": UNKNOWN_CLASS_PICKLE}, "auto", r"raw-captions.pkl: not a readable pickle \(ModuleNotFoundError"),
        ({"train_data.json": [{"video": ["x"], "description": "a", "times": [[0, 1]]}]}, "auto",
         r"train_data.json: \[0\]: video must be a non-empty string, got \['x'\]"),
        ({"train_data.json": [{"video": 0, "description": "a", "times": [[0, 1]]}]}, "auto", r"\[0\]: video must be"),
        ({"train_data.json": [{"video": "video0", "description": "a", "times": [["a", "b"]]}]}, "didemo-moments",
         r"train_data.json: \[0\]: times must be a list of \[start, end\] segment number pairs"),
        ({"train_data.json": [{"video": "video0", "description": "a", "times": [[None, 2]]}]}, "didemo-moments",
         r"\[0\]: times must be a list"),
        ({"train.jsonl": [{"video_id": "a", "video": 5, "caption": "x"}]}, "auto",
         r"train.jsonl:1: video must be a non-empty string, got 5"),
        ({"train.jsonl": [{"video_id": "a", "video": None, "caption": "x"}]}, "auto", r"train.jsonl:1: video must be"),
        ({"train.jsonl": [{"video_id": None, "caption": "x"}]}, "auto", r"train.jsonl:1: video_id must be"),
        ({"MSRVTT_JSFUSION_test.csv": "key,vid_key,video_id,sentence\nk,v,,a cat\n"}, "auto",
         r"MSRVTT_JSFUSION_test.csv:2: video_id must be a non-empty string, got ''"),
        ({"results_train.csv": "videoid,name,page_dir\nv1,a cat\n"}, "auto", r"results_train.csv:2: too few fields, no page_dir"),
    ],
)
def test_fields_of_the_wrong_type_are_errors_naming_file_and_item(tmp_path, files, format, message):
    write_annotation_files(tmp_path, {"train_list.txt": "video0\n", **files})
    (name,) = files
    with pytest.raises(AnnotationError, match=message):
        read_annotations(tmp_path / name, format=format, split="train")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("MSRVTT_data.json", b'{"videos": [],\n "sentences": ["caf\xe9"]}', r"MSRVTT_data.json:2: not UTF-8 text"),
        ("train.jsonl", b'{"video_id": "a", "caption": "ok"}\n{"video_id": "a", "caption": "caf\xe9"}\n',
         r"train.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 34 of the line\)"),
        ("LSMDC16_annos_training.csv", b"clip\t0\t1\t0\t1\tA caf\xe9 scene\n", r"LSMDC16_annos_training.csv:1: not UTF-8"),
        ("results_train.csv", b"videoid,name,page_dir\nv1,caf\xe9,p\n", r"results_train.csv:2: not UTF-8"),
        ("MSRVTT_train.9k.csv", b"video_id\nvid\xe9o0\n", r"MSRVTT_train.9k.csv:2: not UTF-8"),
        ("raw-captions.pkl", pickle.dumps({"video0": [["a"]]}), r"train_list.txt:1: not UTF-8"),
    ],
)
def test_text_that_is_not_utf8_is_an_error_naming_file_and_line(tmp_path, name, content, message):
    write_annotation_files(tmp_path, {"MSRVTT_data.json": MSRVTT_DATA, "train_list.txt": b"vid\xe9o0\n", name: content})
    with pytest.raises(AnnotationError, match=message):
        read_annotations(tmp_path / name, split="train")


@pytest.mark.parametrize(
    "times,message",
    [
        ('"start": NaN, "end": 1', "start must be a number of seconds or null, got nan"),
        ('"start": 0.5, "end": NaN', "end must be a number of seconds or null, got nan"),
        ('"start": 0, "end": Infinity', "end must be a number of seconds or null, got inf"),
        ('"start": -5, "end": -1', "start -5 is negative"),
        ('"start": 2.5, "end": 0.5', "end 0.5 is not after start 2.5"),
        ('"start": 2, "end": 2', "end 2 is not after start 2"),
        ('"end": 0', "end 0 is not after start 0"),
    ],
)
def test_jsonl_clip_times_must_be_finite_non_negative_and_increasing(tmp_path, times, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"video_id": "a", "caption": "ok", "start": 1}) + "\n"
                    + '{"video_id": "a", "caption": "x", ' + times + "}\n")
    with pytest.raises(AnnotationError, match=f"train.jsonl:2: {message}"):
        read_annotations(path)


@pytest.mark.parametrize(
    "times,message",
    [
        ("[[5, 1]]", "end 10.0 is not after start 25.0"),
        ("[[-3, -2]]", "start -15.0 is negative"),
        ("[[NaN, 1]]", "times must be a list of"),
        ("[[0, Infinity]]", "times must be a list of"),
        ("[[true, 1]]", "times must be a list of"),
    ],
)
def test_didemo_moment_times_must_be_finite_non_negative_and_increasing(tmp_path, times, message):
    path = tmp_path / "train_data.json"
    path.write_text('[{"video": "v1.mp4", "description": "a", "times": [[0, 1]]},\n'
                    ' {"video": "v1.mp4", "description": "b", "times": ' + times + "}]")
    with pytest.raises(AnnotationError, match=rf"train_data.json: \[1\]: {message}"):
        read_annotations(path, format="didemo-moments")


def test_repeated_clips_are_kept_with_one_warning_per_file(tmp_path, caplog):
    repeated = {**MSRVTT_DATA, "videos": MSRVTT_DATA["videos"] + MSRVTT_DATA["videos"][:2] + MSRVTT_DATA["videos"][:1]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(repeated))
    (tmp_path / "results_train.csv").write_text("videoid,name,page_dir\nv1,a cat,p\nv2,a dog,p\nv1,a cow,p\n")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nk,v,video0,a cat\nk,v,video0,a dog\n")
    (tmp_path / "test_data.json").write_text(json.dumps(DIDEMO))
    with caplog.at_level("WARNING", logger="stoa_vlp.data.annotations"):
        train = read_annotations(tmp_path / "MSRVTT_data.json", split="train")
    assert [r.video_id for r in train] == ["video0", "video1", "video0", "video1", "video0"]  # kept, as listed
    warning = "MSRVTT_data.json: 2 clips are listed more than once (3 extra records; e.g. video0, video1)"
    assert warning in caplog.text and caplog.text.count("more than once") == 1
    for name, ids in [("results_train.csv", ["v1", "v2", "v1"]), ("MSRVTT_JSFUSION_test.csv", ["video0", "video0"])]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="stoa_vlp.data.annotations"):
            assert [r.video_id for r in read_annotations(tmp_path / name)] == ids
        assert f"{name}: 1 clips are listed more than once (1 extra records; e.g. {ids[0]})" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stoa_vlp.data.annotations"):
        moments = read_annotations(tmp_path / "test_data.json", format="didemo-moments")
    assert [r.video_id for r in moments].count("v1.mp4") == 2 and "more than once" not in caplog.text  # other times
