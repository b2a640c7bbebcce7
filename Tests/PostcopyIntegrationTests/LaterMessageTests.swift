import PostcopyHandoff
import Testing

/// Later VMM messages on the stream socket: glued ones are told apart.
@Suite("VMM later messages")
struct LaterMessageTests {
    @Test func concatenatedObjectsAreSplit() {
        let notice = CompletionNotice.request
        let apf = Array(#"{"apf":{"version":1}}"#.utf8)
        #expect(HandoffServer.jsonObjects(notice + apf) == [notice, apf])
        #expect(HandoffServer.jsonObjects(apf + Array("\n".utf8) + notice) == [apf, notice])
        #expect(HandoffServer.jsonObjects(notice) == [notice])
        let tricky = Array(#"{"a":"}{\"x"}"#.utf8)
        #expect(HandoffServer.jsonObjects(tricky + notice) == [tricky, notice], "braces inside strings do not count")
        #expect(HandoffServer.jsonObjects(Array("{\"a\":1".utf8)).isEmpty, "unterminated")
        #expect(HandoffServer.jsonObjects(Array("x{}".utf8)).isEmpty, "bytes outside an object")
        #expect(HandoffServer.jsonObjects(Array("}{".utf8)).isEmpty)
    }
}
