package funcatron;

import java.util.LinkedHashMap;
import java.util.Map;

/** What a Java Func returns to set the status and headers. */
public final class Response {
    public int status;
    public final Map<String, String> headers = new LinkedHashMap<>();
    /** A String (text), byte[] (binary), null (empty) or anything {@link Json} encodes. */
    public Object body;

    public Response(int status, Object body) { this.status = status; this.body = body; }

    public Response header(String name, String value) {
        headers.put(name.toLowerCase(), value);
        return this;
    }
}
