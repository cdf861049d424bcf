"""Annotation readers on tiny files in each exact format (CLIP4Clip layouts, WebVid, video2dataset, JSONL)."""

from __future__ import annotations

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
